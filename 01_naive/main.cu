// 01_naive command line: `01_naive --help`.
#include "01_naive/kernel.h"

int main(int argc, char** argv) { return lab::run_cli(argc, argv, ch01::chapter()); }
