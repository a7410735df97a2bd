// 08_flash_v3 command line: `08_flash_v3 --help`.
#include "08_flash_v3/kernel.h"

int main(int argc, char** argv) { return lab::run_cli(argc, argv, ch08::chapter()); }
