// 07_kv_quant command line: `07_kv_quant --help`. Every variant decodes the same fp16 problem: the
// driver quantizes its K/V into the variant's scheme first (not timed), checks the output against
// the fp64 reference on the dequantized K/V, and prints the error against the original K/V beside
// it. The chapter's table (accuracy and speed of every scheme) is 07_kv_quant_table.
#include "07_kv_quant/kernel.h"

int main(int argc, char** argv) {
  return lab::run_cli(argc, argv, ch07::chapter(), lab::decode_cli_defaults());
}
