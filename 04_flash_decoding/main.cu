// 04_flash_decoding command line: `04_flash_decoding --help`.
#include "04_flash_decoding/kernel.h"

int main(int argc, char** argv) {
  return lab::run_cli(argc, argv, ch04::chapter(), lab::decode_cli_defaults());
}
