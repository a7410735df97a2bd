#!/usr/bin/env python3
"""README tables, drawn from the committed CSVs under docs/results/ (never typed by hand).

    python3 docs/tables.py           rewrite every table between <!-- results:NAME --> markers
    python3 docs/tables.py --check   exit 1 if a README is out of date with the CSVs (CI runs this)

NAME is one of: summary, decode, chapter:<dir> (a chapter's rows over the prefill grid),
compare:03_flash_v2 (chapter 03 next to PyTorch's backends, same GPU, same session),
decode:<dir> (the decode grid for a decoding chapter and its predecessor, with PyTorch's backends),
paged (paged against contiguous KV), splits (the num_splits sweep against the heuristic's choice),
kvquant (07_kv_quant's schemes: bytes, accuracy and speed, from kv_quant.csv),
steps (every step against its predecessor: lines of code and speedup; the list is docs/steps.py).
NAME@h200 draws the same table from docs/results/h200/ instead of h100/.
lab:<dir> is a chapter's LAB.md table: the solution on the shapes `bench/lab check` times, H100 and H200.
"""
import csv
import glob
import importlib.machinery
import importlib.util
import os
import re
import sys

import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results", "h100")  # the GPU the README numbers come from (see use())
READMES = ["README.md", "01_naive/README.md", "02_flash_v1/README.md", "03_flash_v2/README.md",
           "04_flash_decoding/README.md", "05_decoding_cuda_core/README.md", "06_gqa_alibi/README.md",
           "07_kv_quant/README.md", "08_flash_v3/README.md", "docs/NOTES-03.md", "docs/NOTES-04.md", "docs/NOTES-06.md"]
ORDER = ["01_naive/cublas", "01_naive/naive", "02_flash_v1", "03_flash_v2/loop_order", "03_flash_v2/mma",
         "03_flash_v2/fa2", "03_flash_v2/overlap", "04_flash_decoding", "05_decoding_cuda_core", "06_gqa_alibi"]
PREFILL_ORDER = ORDER[:7] + ["06_gqa_alibi"]  # 04 and 05 are decoding kernels (seqlen_q <= 64 and 1)
DECODE_SHAPES = [(1, 1024), (1, 8192), (1, 32768), (8, 4096), (32, 4096), (128, 1024), (128, 4096), (64, 16384)]
# Each chapter's LAB.md (bench/lab's exercises) holds a table too: its numbers to beat.
LABS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "[0-9][0-9]_*", "LAB.md")))


def load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def step(r):
    return r["chapter"] + ("/" + r["variant"] if r["variant"] else "")


def key(r):
    return (r["workload"], r["dtype"], int(r["batch"]), int(r["heads_q"]), int(r["heads_kv"]),
            int(r["seqlen_q"]), int(r["seqlen_kv"]), int(r["head_dim"]), r["causal"] == "1")


def index(rows, name_of):
    out = {}
    for r in rows:
        if r.get("check", "PASS").startswith("PASS") and float(r["ms"]) > 0:
            out[(name_of(r),) + key(r)] = r
    return out


def mem_ceiling(ceil):
    """The bandwidth a memory-bound row is a percentage of: the streaming read where the run measured
    one (ceilings.csv's read_gbps, kv_quant.csv's too), else the copy (runs older than the read ceiling)."""
    if ceil.get("read_gbps"):
        return "read", float(ceil["read_gbps"])
    return "copy", float(ceil["copy_gbps"])


def header(ceil):
    read = f"streaming read {float(ceil['read_gbps']):.0f} GB/s, " if ceil.get("read_gbps") else ""
    return (f"{ceil['gpu']}, CUDA {ceil['cuda']}, measured {ceil['date']}; ceilings measured in the same run: "
            f"{read}copy {float(ceil['copy_gbps']):.0f} GB/s, fp16 GEMM {float(ceil['gemm_tflops']):.0f} TFLOPS. "
            f"Source: `docs/results/{os.path.basename(RESULTS)}/`.")


MEM_NAME = {"read": "measured streaming-read bandwidth", "copy": "measured copy bandwidth"}


def prefill_key(d, s, causal, dtype="fp16"):
    return ("prefill", dtype, 16384 // s, 2048 // d, 2048 // d, s, s, d, causal)


def decode_key(b, hkv, kv):
    return ("decode", "fp16", b, 32, hkv, 1, kv, 128, False)


def summary(lab, torch, ceil):
    cols = [("d128 full", prefill_key(128, 4096, False)), ("d128 causal", prefill_key(128, 4096, True)),
            ("d64 full", prefill_key(64, 4096, False)), ("d64 causal", prefill_key(64, 4096, True))]
    lines = ["Prefill, fp16, seqlen 4096 (batch 4, hidden 2048): TFLOPS (% of the measured fp16 GEMM rate). "
             + header(ceil), "",
             "| step | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    gemm = float(ceil["gemm_tflops"])

    def cell(r):
        return "-" if r is None else f"{float(r['tflops']):.0f} ({100 * float(r['tflops']) / gemm:.0f}%)"

    for name in PREFILL_ORDER:
        lines.append(f"| {name} | " + " | ".join(cell(lab.get((name,) + k)) for _, k in cols) + " |")
    for name in ("eager_unfused", "flash", "cudnn"):
        label = {"eager_unfused": "PyTorch eager (unfused)", "flash": "PyTorch SDPA flash (FlashAttention-2)",
                 "cudnn": "PyTorch SDPA cuDNN"}[name]
        lines.append(f"| {label} | " + " | ".join(cell(torch.get((name,) + k)) for _, k in cols) + " |")
    return lines


def decode(lab, torch, ceil):
    cols = [(f"b{b} kv{kv // 1024}k {'MHA' if h == 32 else 'GQA 32/8'}", decode_key(b, h, kv))
            for b, h, kv in ((1, 32, 32768), (8, 32, 4096), (128, 32, 4096), (8, 8, 4096))]
    what, copy = mem_ceiling(ceil)
    lines = [f"Decode (one query token, d 128, 32 query heads), fp16: GB/s (% of the {MEM_NAME[what]}). "
             "Chapters 01-03 are prefill kernels run on decoding shapes, the baseline 04 and 05 start from. "
             + header(ceil), "",
             "| step | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]

    def cell(r):
        return "-" if r is None else f"{float(r['gbps']):.0f} ({100 * float(r['gbps']) / copy:.0f}%)"

    for name in ORDER:
        lines.append(f"| {name} | " + " | ".join(cell(lab.get((name,) + k)) for _, k in cols) + " |")
    for name in ("flash", "cudnn"):
        lines.append(f"| PyTorch SDPA {name} | " + " | ".join(cell(torch.get((name,) + k)) for _, k in cols) + " |")
    return lines


def decode_grid(lab, torch, ceil, steps):
    """Every decode-grid shape, MHA and GQA, for `steps` and PyTorch's backends."""
    what, copy = mem_ceiling(ceil)
    lines = ["Decode grid (one query token, d 128, 32 query heads, fp16): GB/s of unique bytes (% of the "
             f"{MEM_NAME[what]}); `sN`: the split count the heuristic chose. **bold**: the fastest of "
             "the decoding chapters shown, at or above cuDNN. " + header(ceil), ""]
    mine = [n for n in steps if not n.startswith("03")]
    for hkv in (32, 8):
        lines += [f"{'MHA 32/32' if hkv == 32 else 'GQA 32/8 (each query head reads its KV head: see 06)'}:", "",
                  "| step | " + " | ".join(f"b{b} kv{kv // 1024}k" for b, kv in DECODE_SHAPES) + " |",
                  "|---|" + "---|" * len(DECODE_SHAPES)]
        best = {}
        for b, kv in DECODE_SHAPES:
            rs = [lab.get((n,) + decode_key(b, hkv, kv)) for n in mine]
            rs = [r for r in rs if r]
            best[(b, kv)] = max(float(r["gbps"]) for r in rs) if rs else None
        for name in steps + ["flash", "cudnn"]:
            src = torch if name in ("flash", "cudnn") else lab
            cells = []
            for b, kv in DECODE_SHAPES:
                r = src.get((name,) + decode_key(b, hkv, kv))
                if r is None:
                    cells.append("-")
                    continue
                g = float(r["gbps"])
                c = f"{g:.0f} ({100 * g / copy:.0f}%)"
                if name in mine:
                    c += f" s{r['splits']}"
                    cud = torch.get(("cudnn",) + decode_key(b, hkv, kv))
                    if best[(b, kv)] == g and cud and g >= float(cud["gbps"]):
                        c = f"**{c}**"
                cells.append(c)
            label = {"flash": "PyTorch SDPA flash", "cudnn": "PyTorch SDPA cuDNN"}.get(name, name)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines[:-1]


def prefill_gqa(ceil):
    """GQA/MQA and ALiBi in prefill, against MHA at the same 32 query heads, same run."""
    rows = raw_rows("prefill_gqa")
    t = {}
    for r in rows:
        t[(step(r), int(r["heads_kv"]), r["causal"] == "1", "alibi" in r["features"])] = float(r["tflops"])
    lines = ["Prefill with 32 query heads, d 128, seqlen 4096, batch 2, fp16: TFLOPS (change against the same "
             "chapter's MHA without ALiBi). " + header(ceil), "",
             "| step | mask | MHA 32/32 | GQA 32/8 | MQA 32/1 | MHA + ALiBi | GQA 32/8 + ALiBi | MQA + ALiBi |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("03_flash_v2/fa2", "03_flash_v2/overlap", "06_gqa_alibi/gqa", "06_gqa_alibi/alibi",
                 "06_gqa_alibi/decode_tile", "06_gqa_alibi"):
        for causal in (False, True):
            base = t.get((name, 32, causal, False))
            cells = []
            for alibi in (False, True):
                for hkv in (32, 8, 1):
                    v = t.get((name, hkv, causal, alibi))
                    if v is None:
                        cells.append("-")
                    elif base and (hkv, alibi) != (32, False):
                        cells.append(f"{v:.0f} ({100 * (v / base - 1):+.1f}%)")
                    else:
                        cells.append(f"{v:.0f}")
            if any(c != "-" for c in cells):
                lines.append(f"| {name} | {'causal' if causal else 'full'} | " + " | ".join(cells) + " |")
    return lines


def hybrid(ceil):
    """One varlen launch for a mixed prefill + decode batch, against two launches."""
    one, two = {}, {}
    for r in raw_rows("hybrid"):
        frac = [f for f in r["features"].split("+") if f.startswith("prefill")][0][len("prefill"):]
        (one if r["variant"] == "one_launch" else two)[frac] = r
    lines = ["Hybrid batches: 32 sequences with 4096 keys of context each, GQA 32/8, d 128, causal, fp16; "
             "some bring a 512-token prefill chunk, the others one decode token. ms (lower is better). "
             + header(ceil), "",
             "| prefill sequences | one varlen launch | prefill and decode as two launches | one launch vs two |",
             "|---|---|---|---|"]
    for frac in sorted(one, key=lambda f: int(f.split("/")[0])):
        o = one[frac]
        t = two.get(frac)
        lines.append(f"| {frac} | {float(o['ms']):.3f} | " + (f"{float(t['ms']):.3f} | {float(t['ms']) / float(o['ms']):.2f}x"
                                                              if t else "- | -") + " |")
    return lines


def compare_torch():
    """bench/compare_torch.py: the chapters and PyTorch's backends on the same tensors, one process."""
    rows = load("compare_torch.csv")
    if not rows:
        return ["(no results yet: run bench/gpu_check.sh build pytest compare)"]
    ok = [r for r in rows if float(r["ms"]) > 0]
    r0 = ok[0]
    shapes = [("prefill d128 s4096 full", ("prefill", 128, 4096, 32, False)),
              ("prefill d128 s4096 causal", ("prefill", 128, 4096, 32, True)),
              ("prefill d64 s4096 full", ("prefill", 64, 4096, 32, False)),
              ("decode b1 kv32k MHA", ("decode", 128, 32768, 32, False, 1)),
              ("decode b8 kv4k MHA", ("decode", 128, 4096, 32, False, 8)),
              ("decode b8 kv4k GQA 32/8", ("decode", 128, 4096, 8, False, 8))]

    def match(r, k):
        if r["workload"] != k[0] or int(r["head_dim"]) != k[1] or int(r["seqlen_kv"]) != k[2]:
            return False
        if int(r["heads_kv"]) != (k[3] if k[0] == "decode" else 2048 // k[1]) or (r["causal"] == "1") != k[4]:
            return False
        return k[0] == "prefill" or int(r["batch"]) == k[5]

    names = []
    for r in ok:
        n = step(r) if r["chapter"] != "pytorch" else "PyTorch " + r["variant"]
        if n not in names:
            names.append(n)
    lines = [f"The chapters and PyTorch's SDPA backends on the same tensors in one process "
             f"(`bench/compare_torch.py`; {r0['gpu']}, PyTorch {r0['torch']}, CUDA {r0['cuda']}, {r0['date']}): "
             "TFLOPS for prefill, GB/s for decode; every lab output checked against PyTorch before and after "
             "timing. Source: `docs/results/h100/compare_torch.csv`, plot `compare.png`.", "",
             "| | " + " | ".join(n for n, _ in shapes) + " |", "|---|" + "---|" * len(shapes)]
    for n in names:
        cells = []
        for _, k in shapes:
            hit = [r for r in ok if match(r, k) and (step(r) if r["chapter"] != "pytorch" else "PyTorch " + r["variant"]) == n]
            if not hit:
                cells.append("-")
            else:
                v = float(hit[0]["tflops"] if k[0] == "prefill" else hit[0]["gbps"])
                cells.append(f"{v:.0f}")
        if any(c != "-" for c in cells):
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def raw_rows(workload):
    return [r for r in load("ladder.csv") if r["workload"] == workload and r["check"].startswith("PASS")
            and float(r["ms"]) > 0]


def paged(lab, ceil):
    """Paged KV against contiguous KV, same shapes, same run."""
    lines = ["Paged KV cache (pages in shuffled order) against contiguous KV, fp16, d 128, 32 heads: GB/s "
             "(change against contiguous). " + header(ceil), "",
             "| chapter | shape | contiguous | page 16 | page 64 | page 256 |", "|---|---|---|---|---|---|"]
    pg = {}
    for r in raw_rows("decode_paged"):
        pg[(r["chapter"], int(r["batch"]), int(r["seqlen_kv"]), r["features"])] = float(r["gbps"])
    for ch in ("04_flash_decoding", "05_decoding_cuda_core"):
        for b, kv in ((1, 32768), (8, 4096), (32, 4096)):
            c = lab.get((ch,) + decode_key(b, 32, kv))
            if c is None:
                continue
            base = float(c["gbps"])
            cells = []
            for page in (16, 64, 256):
                g = pg.get((ch, b, kv, f"paged{page}"))
                cells.append("-" if g is None else f"{g:.0f} ({100 * (g / base - 1):+.1f}%)")
            lines.append(f"| {ch} | b{b} kv{kv // 1024}k | {base:.0f} | " + " | ".join(cells) + " |")
    return lines


def splits_sweep(lab, ceil):
    """The split count forced from 1 to 128, against the heuristic's choice."""
    sweep = {}
    for r in raw_rows("decode_splits"):
        sweep[(r["chapter"], int(r["batch"]), int(r["seqlen_kv"]), int(r["splits"]))] = float(r["gbps"])
    counts = sorted({k[3] for k in sweep})
    lines = ["num_splits forced (MHA, d 128, 32 heads, fp16): GB/s; **bold**: the count the heuristic picks. "
             + header(ceil), "",
             "| chapter | shape | " + " | ".join(f"{c}" for c in counts) + " |", "|---|---|" + "---|" * len(counts)]
    for ch in ("04_flash_decoding", "05_decoding_cuda_core"):
        for b, kv in ((1, 32768), (8, 4096)):
            h = lab.get((ch,) + decode_key(b, 32, kv))
            chosen = int(h["splits"]) if h else None
            cells = []
            for c in counts:
                g = sweep.get((ch, b, kv, c))
                cell = "-" if g is None else f"{g:.0f}"
                cells.append(f"**{cell}**" if c == chosen else cell)
            lines.append(f"| {ch} | b{b} kv{kv // 1024}k | " + " | ".join(cells) + " |")
    return lines


def chapter(lab, ceil, ch):
    steps = [n for n in ORDER if n.split("/")[0] == ch]
    prev = {"01_naive": None, "02_flash_v1": "01_naive/naive", "03_flash_v2": "02_flash_v1"}[ch]
    lines = [f"Prefill grid, fp16, TFLOPS (speedup over `{prev}` on the same shape)" if prev else
             "Prefill grid, fp16, TFLOPS (speedup of the naive kernels over the cuBLAS baseline)",
             header(ceil), ""]
    seqs = [512, 1024, 2048, 4096, 8192, 16384]
    lines += ["| step | d | mask | " + " | ".join(f"s{s}" for s in seqs) + " |", "|---|---|---|" + "---|" * len(seqs)]
    for d in (64, 128):
        for causal in (False, True):
            for name in steps:
                cells = []
                for s in seqs:
                    k = prefill_key(d, s, causal)
                    r = lab.get((name,) + k)
                    base_name = prev if prev else ("01_naive/cublas" if name != "01_naive/cublas" else None)
                    b = lab.get((base_name,) + k) if base_name else None
                    if r is None:
                        cells.append("-")
                    elif b is None:
                        cells.append(f"{float(r['tflops']):.1f}")
                    else:
                        cells.append(f"{float(r['tflops']):.1f} ({float(b['ms']) / float(r['ms']):.1f}x)")
                lines.append(f"| {name} | {d} | {'causal' if causal else 'full'} | " + " | ".join(cells) + " |")
    return lines


def compare03(lab, torch, ceil):
    """03's steps next to PyTorch's FlashAttention-2 and cuDNN, timed in one process (compare_torch.csv)."""
    seqs = [512, 1024, 2048, 4096, 8192, 16384]
    rows = load("compare_torch.csv")
    same = index(rows, lambda r: step(r) if r["chapter"] != "pytorch" else r["variant"])
    r0 = rows[0] if rows else {}
    mine = [n for n in ORDER if n.startswith("03_flash_v2/") and any(k[0] == n for k in same)]
    lines = ["Chapter 03's steps and PyTorch's FlashAttention-2 and cuDNN backends on the same tensors in one process "
             f"(`bench/compare_torch.py`; {r0.get('gpu')}, PyTorch {r0.get('torch')}, CUDA {r0.get('cuda')}, "
             f"{r0.get('date')}), fp16 TFLOPS; **bold**: 03's best step at or above FlashAttention-2. Source: "
             f"`docs/results/{os.path.basename(RESULTS)}/compare_torch.csv`.", "",
             "| d | mask | | " + " | ".join(f"s{s}" for s in seqs) + " |", "|---|---|---|" + "---|" * len(seqs)]
    for d in (64, 128):
        for causal in (False, True):
            m = "causal" if causal else "full"
            ks = [prefill_key(d, s, causal) for s in seqs]
            best = [max([float(r["tflops"]) for r in (same.get((n,) + k) for n in mine) if r] or [0]) for k in ks]
            fa2 = [same.get(("flash",) + k) for k in ks]
            for n in mine:
                cells = []
                for k, b, f in zip(ks, best, fa2):
                    r = same.get((n,) + k)
                    v = float(r["tflops"]) if r else None
                    c = "-" if v is None else f"{v:.0f}"
                    cells.append(f"**{c}**" if v is not None and v == b and f and v >= float(f["tflops"]) else c)
                lines.append(f"| {d} | {m} | {n.split('/')[1]} | " + " | ".join(cells) + " |")
            for name, label in (("flash", "FlashAttention-2"), ("cudnn", "cuDNN")):
                lines.append(f"| {d} | {m} | {label} | " + " | ".join(
                    f"{float(r['tflops']):.0f}" if r else "-" for r in (same.get((name,) + k) for k in ks)) + " |")
    return lines


STEPS_08 = ["08_flash_v3/wgmma", "08_flash_v3/tma", "08_flash_v3/ws", "08_flash_v3/pingpong"]


def compare08(lab, torch, ceil):
    """08's steps next to 03's best step and PyTorch's FlashAttention-2 and cuDNN backends, on the same
    tensors in one process (compare_torch.csv), with the last step's ratio to cuDNN; then bf16 against
    fp16 at seqlen 4096 from the ladder."""
    rows = load("compare_torch.csv")
    if not rows:
        return ["(no results yet: run bench/gpu_check.sh build compare on a Hopper GPU)"]
    same = index(rows, lambda r: step(r) if r["chapter"] != "pytorch" else r["variant"])
    # The sequence lengths the run timed (compare_torch --quick: 1k and 4k).
    seqs = [s for s in (512, 1024, 2048, 4096, 8192, 16384)
            if any(same.get(("cudnn",) + prefill_key(d, s, c)) for d in (64, 128) for c in (False, True))]
    r0 = rows[0]
    ours03 = [n for n in ORDER if n.startswith("03_flash_v2/")]
    lines = ["Chapter 08's steps, 03's best step and PyTorch's FlashAttention-2 and cuDNN backends on the same "
             f"tensors in one process (`bench/compare_torch.py`; {r0.get('gpu')}, PyTorch {r0.get('torch')}, "
             f"CUDA {r0.get('cuda')}, {r0.get('date')}), fp16 TFLOPS (batch 16k / seqlen, hidden 2048); "
             "**bold**: at least 0.9x cuDNN. Source: "
             f"`docs/results/{os.path.basename(RESULTS)}/compare_torch.csv`.", "",
             "| d | mask | | " + " | ".join(f"s{s}" for s in seqs) + " |", "|---|---|---|" + "---|" * len(seqs)]
    for d in (64, 128):
        for causal in (False, True):
            m = "causal" if causal else "full"
            ks = [prefill_key(d, s, causal) for s in seqs]
            cud = [same.get(("cudnn",) + k) for k in ks]

            def cells(rs, bold=False):
                out = []
                for r, c in zip(rs, cud):
                    if r is None:
                        out.append("-")
                        continue
                    v = f"{float(r['tflops']):.0f}"
                    out.append(f"**{v}**" if bold and c and float(r["tflops"]) >= 0.9 * float(c["tflops"]) else v)
                return out

            best03 = [max((same.get((n,) + k) for n in ours03 if same.get((n,) + k)),
                          key=lambda r: float(r["tflops"]), default=None) for k in ks]
            lines.append(f"| {d} | {m} | 03 best step | " + " | ".join(cells(best03)) + " |")
            for n in STEPS_08:
                lines.append(f"| {d} | {m} | 08 {n.split('/')[1]} | " +
                             " | ".join(cells([same.get((n,) + k) for k in ks], bold=True)) + " |")
            for name, label in (("flash", "FlashAttention-2"), ("cudnn", "cuDNN")):
                lines.append(f"| {d} | {m} | {label} | " + " | ".join(cells([same.get((name,) + k) for k in ks])) + " |")
            last = [same.get((STEPS_08[-1],) + k) for k in ks]
            lines.append(f"| {d} | {m} | pingpong / cuDNN | " + " | ".join(
                f"{float(r['tflops']) / float(c['tflops']):.2f}x" if r and c else "-" for r, c in zip(last, cud)) + " |")
    lines += ["", "The last step in bf16 against fp16, seqlen 4096, the ladder of the same GPU (TFLOPS). "
              + header(ceil), "", "| step | d | mask | fp16 | bf16 | bf16 / fp16 |", "|---|---|---|---|---|---|"]
    for n in STEPS_08[-1:]:
        for d in (64, 128):
            for causal in (False, True):
                f = lab.get((n,) + prefill_key(d, 4096, causal))
                b = lab.get((n,) + prefill_key(d, 4096, causal, "bf16"))
                if f is None and b is None:
                    continue
                fv = f"{float(f['tflops']):.0f}" if f else "-"
                bv = f"{float(b['tflops']):.0f}" if b else "-"
                ratio = f"{float(b['tflops']) / float(f['tflops']):.2f}" if f and b else "-"
                lines.append(f"| {n.split('/')[1]} | {d} | {'causal' if causal else 'full'} | {fv} | {bv} | {ratio} |")
    return lines


def bf16_03(lab, ceil):
    """bf16 against fp16 for 03's tensor-core steps, seqlen 4096, same ladder run."""
    lines = ["bf16 against fp16, seqlen 4096, same ladder run. " + header(ceil)]
    bf = []
    for d in (64, 128):
        for causal in (False, True):
            for n in ("03_flash_v2/fa2", "03_flash_v2/overlap"):
                a = lab.get((n,) + prefill_key(d, 4096, causal, "fp16"))
                b = lab.get((n,) + prefill_key(d, 4096, causal, "bf16"))
                if a and b:
                    bf.append(f"| {n} | {d} | {'causal' if causal else 'full'} | {float(a['tflops']):.1f} | "
                              f"{float(b['tflops']):.1f} | {100 * (float(b['tflops']) / float(a['tflops']) - 1):+.1f}% |")
    lines += ["", "| step | d | mask | fp16 TFLOPS | bf16 TFLOPS | bf16 vs fp16 |", "|---|---|---|---|---|---|"] + bf
    return lines


KVQUANT_SHAPES = [(8, 4096), (32, 4096), (1, 32768)]


def kvquant():
    """07_kv_quant_table's CSV: per scheme, bytes stored, error against the fp64 reference, speed."""
    rows = load("kv_quant.csv")
    if not rows:
        return ["(no results yet: run `bench/gpu_check.sh build kvquant` on the GPU and copy "
                f"`gpu_check_out/kv_quant.csv` to `docs/results/{os.path.basename(RESULTS)}/`)"]
    first = rows[0]
    what, bw = mem_ceiling(first)
    src = (f"{first['gpu']}, CUDA {first['cuda']}, measured {first['date']}; {MEM_NAME[what][9:]} measured in the "
           f"same run: {bw:.0f} GB/s. Source: `docs/results/{os.path.basename(RESULTS)}/kv_quant.csv`.")
    target = ("1.8x the fp16 variant for every scheme, and the fp16 variant at 95% of the streaming-read bandwidth"
              if what == "read" else "1.8x the fp16 variant and 85% of the copy bandwidth")
    order = []
    by = {}
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
        by[(r["variant"], int(r["batch"]), int(r["seqlen_kv"]))] = r

    def e(x):
        return f"{float(x):.1e}"

    lines = ["Accuracy: decoding output (b8, 32 heads, 4096 keys, d 128, every row) against the fp64 reference on "
             "the original fp16 K/V, as relative L2 / max abs error; \"outliers\": one channel in 16 with a 10x "
             "spread in K and V. \"kernel alone\": against the reference on the dequantized K/V (must pass the "
             "fp16 tolerance, 2^-9 relative L2). Bytes: stored per token and KV head for K and V together, "
             "scales included. " + src, "",
             "| scheme | bytes / token / head | normal K/V | outlier channels | kernel alone (normal / outliers) |",
             "|---|---|---|---|---|"]
    for v in order:
        r = by.get((v, 8, 4096))
        if r is None:
            continue
        lines.append(f"| {v} | {float(r['kv_bytes_per_token_head']):.1f} | {e(r['quant_rel_l2_normal'])} / "
                     f"{e(r['quant_max_abs_normal'])} | {e(r['quant_rel_l2_outliers'])} / "
                     f"{e(r['quant_max_abs_outliers'])} | {e(r['kernel_rel_l2_normal'])} / "
                     f"{e(r['kernel_rel_l2_outliers'])} |")
    lines += ["", f"Speed: decoding time, GB/s of the bytes stored (% of the {MEM_NAME[what][9:]}) and speedup over "
              "this chapter's fp16 variant on the same shape (32 heads, d 128, normal K/V, L2 flushed, median). "
              f"Target at batch >= 8 and 4096+ keys: {target} (**bold**: met).", "",
              "| scheme | " + " | ".join(f"b{b} kv{kv // 1024}k" for b, kv in KVQUANT_SHAPES) + " |",
              "|---|" + "---|" * len(KVQUANT_SHAPES)]
    for v in order:
        cells = []
        for b, kv in KVQUANT_SHAPES:
            r = by.get((v, b, kv))
            if r is None or not r["check"].startswith("PASS") or float(r["ms"]) <= 0:
                cells.append("-" if r is None else "FAIL")
                continue
            c = f"{float(r['ms']) * 1000:.0f} us, {float(r['gbps']):.0f} GB/s ({float(r['pct_peak']):.0f}%)"
            if v != "fp16":
                c += f", {float(r['speedup_vs_fp16']):.2f}x"
            cells.append(f"**{c}**" if r["target"] == "met" else c)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


# Chapters whose timed steps postdate the committed runs: the step shown beside them, its label, and why.
LAB_REFERENCE = {
    "06_gqa_alibi": ("", "step 3 (`kernel.cu`, not timed)",
                     "The committed runs predate 06's split into steps: steps gqa and alibi were never measured, "
                     "and the chapter's rows there are its final kernel's (step 3), shown for scale; `check` "
                     "times steps gqa and alibi against the solution on your GPU."),
}


def lab_targets(ch):
    """LAB.md: the solution's speed on the shapes `bench/lab check` times (bench/lab's TIMED), both GPUs."""
    loader = importlib.machinery.SourceFileLoader("bench_lab", os.path.join(ROOT, "bench", "lab"))
    spec = importlib.util.spec_from_loader("bench_lab", loader)
    tool = importlib.util.module_from_spec(spec)
    loader.exec_module(tool)
    gpus = ("h100", "h200")
    data = {g: use(g) for g in gpus}
    srcs = "; ".join(f"{c['gpu']}, CUDA {c['cuda']}, measured {c['date']}" for c in (data[g][2] for g in gpus) if c)
    lines = ["The solution on the shapes `bench/lab check` times, fp16, from the ladder (median, L2 flushed): "
             "TFLOPS for prefill (% of the fp16 GEMM rate measured in the same run), GB/s for decode (% of the "
             f"streaming read or, in runs older than that ceiling, of the copy measured in the same run). {srcs}. Sources: " + ", ".join(f"`docs/results/{g}/ladder.csv`" for g in gpus)
             + ".", "", "| step | shape | " + " | ".join(g.upper() for g in gpus) + " |", "|---|---|" + "---|" * len(gpus)]
    timed = [(variant, s, variant or ch) for variant, s in tool.TIMED[ch]]
    if ch in LAB_REFERENCE:
        ref, label, why = LAB_REFERENCE[ch]
        shapes = []
        for _, s in tool.TIMED[ch]:
            if s not in shapes:
                shapes.append(s)
        timed += [(ref, s, label) for s in shapes]
        lines[0] += " " + why
    missing = False
    for variant, s, label in timed:
        name = ch + ("/" + variant if variant else "")
        k = (s["workload"], "fp16", s["batch"], s["heads_q"], s["heads_kv"], s["seqlen_q"], s["seqlen_kv"],
             s["head_dim"], s["causal"])
        cells = []
        for g in gpus:
            lab, _, ceil = data[g]
            r = lab.get((name,) + k)
            if r is None:
                cells.append("-")
                missing = True
            elif s["workload"] == "prefill":
                cells.append(f"{float(r['tflops']):.1f} TFLOPS ({100 * float(r['tflops']) / float(ceil['gemm_tflops']):.0f}%)")
            else:
                what, bw = mem_ceiling(ceil)
                cells.append(f"{float(r['gbps']):.0f} GB/s ({100 * float(r['gbps']) / bw:.0f}% of {what})")
        h = f"h{s['heads_q']}" + (f"/{s['heads_kv']}" if s["heads_kv"] != s["heads_q"] else "")  # GQA: query/KV heads
        shape = (f"b{s['batch']} {h} s{s['seqlen_q']} d{s['head_dim']} {'causal' if s['causal'] else 'full'}"
                 if s["workload"] == "prefill" else f"b{s['batch']} {h} kv{s['seqlen_kv'] // 1024}k d{s['head_dim']}")
        lines.append(f"| {label} | {s['workload']} {shape} | " + " | ".join(cells) + " |")
    if missing:
        lines[0] += " `-`: no committed row for that step and shape (not measured yet)."
    if ch == "07_kv_quant":
        lines = lab_targets_kvquant(lines, tool.TIMED[ch], gpus)
    return lines


def lab_targets_kvquant(lines, timed, gpus):
    """07's LAB.md: its timed variants (step 1, dequant_*) are not in ladder.csv yet; beside them, the
    same schemes' step 2 and the fp16 baseline from kv_quant.csv, each GPU's run named as it is."""
    runs = {}
    for g in gpus:
        use(g)  # points load() at this GPU's folder
        runs[g] = {(r["variant"], int(r["batch"]), int(r["heads_q"]), int(r["heads_kv"]), int(r["seqlen_kv"]),
                    int(r["head_dim"])): r for r in load("kv_quant.csv")
                   if r["check"].startswith("PASS") and float(r["ms"]) > 0}
    firsts = [next(iter(runs[g].values()), None) for g in gpus]
    dates = "; ".join(f"{r['gpu']}, measured {r['date']}" for r in firsts if r)
    lines[0] += (" Step 1 (`dequant_*`, the kernel you edit) has not been measured on either GPU yet: its cells "
                 "read -, and `bench/lab check` times it against the solution on your GPU. For scale, the rows "
                 "below it are step 2 (`kernel.cu`) on the same scheme and the fp16 cache, from "
                 "`docs/results/<gpu>/kv_quant.csv` (GB/s of the bytes stored, % of the read or copy bandwidth "
                 f"measured in that run, speedup over fp16; {dates}). The H100's step 2 is an earlier kernel, before the "
                 "`dp4a` K path.")
    # Step 2 on each timed scheme, then the fp16 cache, once per shape.
    rows = [(v.replace("dequant_", "", 1), s) for v, s in timed] + [("fp16", s) for _, s in timed]
    seen = []
    for v, s in rows:
        k = (v, s["batch"], s["heads_q"], s["heads_kv"], s["seqlen_kv"], s["head_dim"])
        if k in seen:
            continue
        seen.append(k)
        cells = []
        for g in gpus:
            r = runs[g].get(k)
            cells.append("-" if r is None else f"{float(r['gbps']):.0f} GB/s ({float(r['pct_peak']):.0f}% of "
                         f"{mem_ceiling(r)[0]})"
                         + ("" if v == "fp16" else f", {float(r['speedup_vs_fp16']):.2f}x"))
        what = "fp16 cache" if v == "fp16" else v
        lines.append(f"| step 2 on {what} (kv_quant.csv) | decode b{s['batch']} h{s['heads_q']} "
                     f"kv{s['seqlen_kv'] // 1024}k d{s['head_dim']} | " + " | ".join(cells) + " |")
    return lines


def render(name, lab, torch, ceil):
    if name.startswith("lab:"):
        return lab_targets(name.split(":", 1)[1])
    if name == "summary":
        return summary(lab, torch, ceil)
    if name == "decode":
        return decode(lab, torch, ceil)
    if name.startswith("chapter:"):
        return chapter(lab, ceil, name.split(":", 1)[1])
    if name == "compare:03_flash_v2":
        return compare03(lab, torch, ceil)
    if name == "compare:08_flash_v3":
        return compare08(lab, torch, ceil)
    if name == "bf16:03_flash_v2":
        return bf16_03(lab, ceil)
    if name == "decode:04_flash_decoding":
        return decode_grid(lab, torch, ceil, ["03_flash_v2/fa2", "04_flash_decoding"])
    if name == "decode:05_decoding_cuda_core":
        return decode_grid(lab, torch, ceil, ["04_flash_decoding", "05_decoding_cuda_core"])
    if name == "decode:06_gqa_alibi":
        return decode_grid(lab, torch, ceil, ["04_flash_decoding", "05_decoding_cuda_core", "06_gqa_alibi/gqa",
                                              "06_gqa_alibi/alibi", "06_gqa_alibi/decode_tile", "06_gqa_alibi"])
    if name == "prefill_gqa":
        return prefill_gqa(ceil)
    if name == "hybrid":
        return hybrid(ceil)
    if name == "compare_torch":
        return compare_torch()
    if name == "paged":
        return paged(lab, ceil)
    if name == "splits":
        return splits_sweep(lab, ceil)
    if name == "kvquant":
        return kvquant()
    if name == "steps":
        return steps.table([(g.upper(), f"docs/results/{g}/ladder.csv", use(g)[0]) for g in ("h100", "h200")],
                           prefill_key, decode_key)
    raise SystemExit(f"unknown table {name}")


_loaded = {}


def use(gpu):
    """Points load() at docs/results/<gpu>/ and returns that GPU's ladder, PyTorch rows and ceilings
    (read once per GPU)."""
    global RESULTS
    RESULTS = os.path.join(ROOT, "docs", "results", gpu)
    if gpu not in _loaded:
        ceil = load("ceilings.csv")
        _loaded[gpu] = (index(load("ladder.csv"), step), index(load("torch_sdpa.csv"), lambda r: r["variant"]),
                        ceil[0] if ceil else None)
    return _loaded[gpu]


def main():
    check = "--check" in sys.argv
    stale = []
    for rel in READMES + LABS:
        path = os.path.join(ROOT, rel)
        if not os.path.exists(path):
            continue
        text = open(path).read()

        def fill(m):
            name, _, gpu = m.group(1).partition("@")
            body = "\n".join(render(name, *use(gpu or "h100")))
            return f"<!-- results:{m.group(1)} -->\n{body}\n<!-- /results -->"

        new = re.sub(r"<!-- results:(\S+) -->.*?<!-- /results -->", fill, text, flags=re.S)
        if new != text:
            stale.append(rel)
            if not check:
                open(path, "w").write(new)
    if check and stale:
        sys.exit("tables out of date with docs/results (run python3 docs/tables.py): " + ", ".join(stale))
    print(("up to date: " if check else "rewrote: ") + (", ".join(stale) if stale else "nothing to change"))


if __name__ == "__main__":
    main()
