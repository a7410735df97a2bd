// 02_flash_v1 command line: `02_flash_v1 --help`.
#include "02_flash_v1/kernel.h"

int main(int argc, char** argv) { return lab::run_cli(argc, argv, ch02::chapter()); }
