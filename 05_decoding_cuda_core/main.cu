// 05_decoding_cuda_core command line: `05_decoding_cuda_core --help`.
#include "05_decoding_cuda_core/kernel.h"

int main(int argc, char** argv) {
  return lab::run_cli(argc, argv, ch05::chapter(), lab::decode_cli_defaults());
}
