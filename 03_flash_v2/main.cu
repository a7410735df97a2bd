// 03_flash_v2 command line: `03_flash_v2 --help`.
#include "03_flash_v2/kernel.h"

int main(int argc, char** argv) { return lab::run_cli(argc, argv, ch03::chapter()); }
