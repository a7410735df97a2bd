#!/usr/bin/env python3
"""The lab's steps in reading order: each step's kernel files, the step it is read against, and its idea.

STEPS is the one list of them. A new step is one more line there; docs/tables.py then draws the top
README's step table (<!-- results:steps -->) from it: the code lines the step adds and removes
against its predecessor, counted from the files, and its speedup over the predecessor, taken from
the committed ladder CSVs (docs/results/<gpu>/ladder.csv) where both were measured in one run.

    python3 docs/steps.py     print the line counts (no CSV needed)
"""
import difflib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Where a step's speedup is read: the ladder's shapes that show its idea (see docs/tables.py's keys).
#   prefill: fp16, seqlen 4096, hidden 2048, full mask;  decode: one query token, 32 heads, d 128.
SHAPES = {
    "prefill": [("d128 s4k", ("prefill", 128, 4096)), ("d64 s4k", ("prefill", 64, 4096))],
    "decode": [("b8 kv4k", ("decode", 8, 32, 4096)), ("b1 kv32k", ("decode", 1, 32, 32768))],
    "gqa": [("GQA 32/8 b8 kv4k", ("decode", 8, 8, 4096)), ("prefill d128 s4k", ("prefill", 128, 4096))],
}

# (step as the ladder names it, its kernel files, the step it is read against, "rewrite" where the
#  diff is a rewrite and the chapter README maps the places to read side by side, where its speedup
#  is read (SHAPES), the idea in a few words)
STEPS = [
    ("01_naive/cublas", ["01_naive/cublas_baseline.cu"], None, "", "prefill",
     "the unfused baseline: two cuBLAS GEMMs around a softmax kernel, S in HBM"),
    ("01_naive/naive", ["01_naive/kernel.cu"], None, "", "prefill",
     "attention as three kernels: S = QK^T, the row softmax and PV, S in HBM"),
    ("02_flash_v1", ["02_flash_v1/kernel.cu"], "01_naive/naive", "rewrite", "prefill",
     "FlashAttention-1: tiles of K, V and Q, online softmax; S never leaves the chip"),
    ("03_flash_v2/loop_order", ["03_flash_v2/kernel_loop_order.cu"], "02_flash_v1", "", "prefill",
     "FlashAttention-2's loop order: a block owns Q_i, O_i stays on chip and is written once"),
    ("03_flash_v2/mma", ["03_flash_v2/kernel_mma.cu"], "03_flash_v2/loop_order", "rewrite", "prefill",
     "the same algorithm on tensor cores: mma.sync, ldmatrix, P in registers, exp2"),
    ("03_flash_v2/fa2", ["03_flash_v2/kernel.cu"], "03_flash_v2/mma", "", "prefill",
     "cp.async double buffering of K_j, V_j and XOR-swizzled shared memory"),
    ("03_flash_v2/overlap", ["03_flash_v2/kernel_overlap.cu"], "03_flash_v2/fa2", "", "prefill",
     "the softmax of S_j overlapped with the QK^T of S_{j+1}"),
    ("04_flash_decoding", ["04_flash_decoding/kernel.cu", "04_flash_decoding/combine.cu"], "03_flash_v2/fa2",
     "rewrite", "decode", "split-KV decoding on 03's tensor cores: warps and blocks split the keys, LSE combine"),
    ("05_decoding_cuda_core", ["05_decoding_cuda_core/kernel.cu"], "04_flash_decoding", "rewrite", "decode",
     "decoding on CUDA cores: a thread group per key, 16-byte loads, shuffle reductions"),
    ("06_gqa_alibi/gqa", ["06_gqa_alibi/kernel_gqa.cu"], "03_flash_v2/fa2", "", "gqa",
     "GQA/MQA: a KV group's query heads packed into the tile rows, K_j, V_j read once per group"),
    ("06_gqa_alibi/alibi", ["06_gqa_alibi/kernel_alibi.cu"], "06_gqa_alibi/gqa", "", "gqa",
     "ALiBi's bias in the scores and varlen batches (cu_seqlens) in one launch"),
    ("06_gqa_alibi/decode_tile", ["06_gqa_alibi/kernel_decode_tile.cu"], "06_gqa_alibi/alibi", "", "gqa",
     "a decoding tile: the 4 warps split each K/V tile's keys, merged by merge_key_warps.cuh (read as a unit)"),
    ("06_gqa_alibi", ["06_gqa_alibi/kernel.cu"], "06_gqa_alibi/decode_tile", "", "gqa",
     "split-KV across blocks for small decoding batches, merged by 04's combine"),
    ("07_kv_quant/dequant_int8_head", ["07_kv_quant/kernel_dequant.cu"],
     "05_decoding_cuda_core", "", "decode",
     "05's kernel reading 1-byte codes (int8 here; FP8 alike), dequantized in registers, the scale per key"),
    ("07_kv_quant/int8_head", ["07_kv_quant/kernel.cu"],
     "07_kv_quant/dequant_int8_head", "rewrite", "decode",
     "the fast kernel: two heads per block, 256-thread blocks, dp4a q.k, pointer stepping"),
    ("08_flash_v3/wgmma", ["08_flash_v3/kernel_wgmma.cu"], "03_flash_v2/fa2", "rewrite", "prefill",
     "Hopper's wgmma: one warpgroup, Q, K, V in 128-byte-swizzled shared memory, P from registers"),
    ("08_flash_v3/tma", ["08_flash_v3/kernel_tma.cu"], "08_flash_v3/wgmma", "", "prefill",
     "K_j, V_j by the tensor memory accelerator into a ring of stages guarded by mbarriers"),
    ("08_flash_v3/ws", ["08_flash_v3/kernel_ws.cu"], "08_flash_v3/tma", "", "prefill",
     "warp specialization: a producer warpgroup issues TMA, two consumers compute, setmaxnreg"),
    ("08_flash_v3/pingpong", ["08_flash_v3/kernel.cu"], "08_flash_v3/ws", "", "prefill",
     "pingpong: named barriers order the consumers' GEMMs so one's softmax hides under the other's"),
]


def code_lines(files):
    """The lines of code of `files`, in order: no blank lines, no comment-only lines, whitespace
    collapsed (so that a block moved one level in or out counts as unchanged, as `diff -w` sees it)."""
    out = []
    for rel in files:
        with open(os.path.join(ROOT, rel)) as f:
            for line in f:
                s = line.strip()
                if s and not s.startswith("//"):
                    out.append(" ".join(s.split()))
    return out


def diff_counts(old_files, new_files):
    """(added, removed) lines of code from old_files to new_files."""
    added = removed = 0
    for line in difflib.unified_diff(code_lines(old_files), code_lines(new_files), lineterm="", n=0):
        if line.startswith(("+++", "---")):
            continue
        added += line.startswith("+")
        removed += line.startswith("-")
    return added, removed


def files_of(step):
    return next(s[1] for s in STEPS if s[0] == step)


def table(ladders, prefill_key, decode_key):
    """The README table. ladders: [(gpu label, the ladder indexed as docs/tables.py's index() makes it)]."""
    def key(k):
        return prefill_key(k[1], k[2], False) if k[0] == "prefill" else decode_key(k[1], k[2], k[3])

    lines = ["Each step of each chapter against the step it is read against (`diff -u -w OLD NEW`). Lines: "
             "lines of code added / removed (comments and blank lines not counted, whitespace ignored), computed "
             "from the files by `docs/steps.py`; **rewrite**: the diff is not one idea, and the chapter's README "
             "maps the places to read side by side. Speedup: the predecessor's time over the step's, same shape, "
             "same ladder run (" + ", ".join(f"{g}: `{src}`" for g, src, _ in ladders) + "), fp16: `d128 s4k` is "
             "prefill at head_dim 128, seqlen 4096, batch 4, 16 heads, full mask (`d64`: 32 heads); `b8 kv4k` "
             "decoding one token for batch 8 from 4096 keys, 32 heads, d 128 (`GQA 32/8`: 8 KV heads); "
             "\"not measured yet\" where a ladder has no row for both.", "",
             "| step | files | read against | lines +/- | the idea | speedup over the predecessor (" +
             " / ".join(g for g, _, _ in ladders) + ") |", "|---|---|---|---|---|---|"]
    for name, files, prev, kind, shapes, idea in STEPS:
        if prev is None:
            change, against, speed = f"{len(code_lines(files))} (new)", "-", "-"
        else:
            a, r = diff_counts(files_of(prev), files)
            change = f"+{a} / -{r}" + (" **rewrite**" if kind == "rewrite" else
                                       " (over the ~150-line bound for one idea)" if a + r > 150 else "")
            against = f"`{prev}`"
            cells = []
            for label, k in SHAPES[shapes]:
                ratios = []
                for _, _, lab in ladders:
                    mine, base = lab.get((name,) + key(k)), lab.get((prev,) + key(k))
                    ratios.append(f"{float(base['ms']) / float(mine['ms']):.2f}x" if mine and base else None)
                if any(ratios):
                    cells.append(f"{label}: " + " / ".join(r or "-" for r in ratios))
            speed = "; ".join(cells) if cells else "not measured yet"
        lines.append(f"| `{name}` | " + ", ".join(f"`{f}`" for f in files) + f" | {against} | {change} | {idea} | "
                     f"{speed} |")
    return lines


if __name__ == "__main__":
    for name, files, prev, kind, _, idea in STEPS:
        if prev:
            a, r = diff_counts(files_of(prev), files)
            print(f"{name:26} against {prev:24} +{a:<4} -{r:<4} {kind}")
        else:
            print(f"{name:26} {len(code_lines(files))} lines (new)")
