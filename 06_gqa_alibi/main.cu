// 06_gqa_alibi command line: `06_gqa_alibi --help`.
#include "06_gqa_alibi/kernel.h"

int main(int argc, char** argv) { return lab::run_cli(argc, argv, ch06::chapter()); }
