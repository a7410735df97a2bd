#!/usr/bin/env python3
"""Plots of the ladder, drawn from its CSV (never from typed numbers).

    python3 docs/plot.py DIR      reads DIR/ladder.csv and DIR/ceilings.csv, writes DIR/prefill.png
                                  and DIR/decode.png (one line per chapter step, ceiling drawn in)
"""
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if not r["workload"].startswith("#")]


def label(r):
    return r["chapter"] + ("/" + r["variant"] if r["variant"] else "")


def ok(r):
    return r["check"].startswith("PASS") and float(r["ms"]) > 0


def plot_prefill(rows, ceil, gpu, out):
    rows = [r for r in rows if r["workload"] == "prefill" and ok(r)]
    if not rows:
        return None
    panels = sorted({(int(r["head_dim"]), r["causal"] == "1") for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        lines = defaultdict(list)
        for r in rows:
            if int(r["head_dim"]) == d and (r["causal"] == "1") == causal:
                lines[label(r)].append((int(r["seqlen_q"]), float(r["tflops"])))
        for name in sorted(lines, key=lambda n: min(p[1] for p in lines[n])):
            pts = sorted(lines[name])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(ceil["gemm_tflops"], color="black", linestyle="--", linewidth=1,
                   label=f"fp16 GEMM ceiling ({ceil['gemm_tflops']:.0f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (batch = 16k / seqlen)")
        ax.set_ylabel("TFLOPS")
        ax.set_title(f"prefill fp16, d={d}, {'causal' if causal else 'full'}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Prefill: throughput against sequence length ({gpu})")
    fig.tight_layout()
    path = os.path.join(out, "prefill.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decode(rows, ceil, gpu, out):
    # fp16 KV caches only: 07_kv_quant's int8/FP8 variants read half the bytes and have their own
    # table (07_kv_quant/README.md); its fp16 variant, the same kernel on the fp16 cache, stays.
    rows = [r for r in rows if r["workload"] == "decode" and ok(r)
            and (r["chapter"] != "07_kv_quant" or r["variant"] == "fp16")]
    if not rows:
        return None
    groups = sorted({(int(r["heads_q"]), int(r["heads_kv"])) for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False)
    for ax, (hq, hkv) in zip(axes[0], groups):
        sel = [r for r in rows if int(r["heads_q"]) == hq and int(r["heads_kv"]) == hkv]
        shapes = sorted({(int(r["batch"]), int(r["seqlen_kv"])) for r in sel})
        x_of = {s: i for i, s in enumerate(shapes)}
        lines = defaultdict(list)
        for r in sel:
            lines[label(r)].append((x_of[(int(r["batch"]), int(r["seqlen_kv"]))], float(r["gbps"])))
        for name in sorted(lines, key=lambda n: min(p[1] for p in lines[n])):
            pts = sorted(lines[name])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if ceil.get("read_gbps"):
            ax.axhline(ceil["read_gbps"], color="black", linestyle="-", linewidth=1,
                       label=f"streaming-read ceiling ({ceil['read_gbps']:.0f} GB/s)")
        ax.axhline(ceil["copy_gbps"], color="black", linestyle="--", linewidth=1,
                   label=f"copy ceiling ({ceil['copy_gbps']:.0f} GB/s)")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"b{b}\nkv{k // 1024}k" for b, k in shapes], fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("batch and KV length (sorted by batch)")
        ax.set_ylabel("GB/s (Q + K + V + O bytes, each once)")
        ax.set_title(f"decode fp16, d=128, heads {hq}/{hkv}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Decode (seqlen_q = 1): throughput against batch size ({gpu})")
    fig.tight_layout()
    path = os.path.join(out, "decode.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    rows = read_rows(os.path.join(out, "ladder.csv"))
    with open(os.path.join(out, "ceilings.csv"), newline="") as f:
        c = next(csv.DictReader(f))
    ceil = {"gemm_tflops": float(c["gemm_tflops"]), "copy_gbps": float(c["copy_gbps"]),
            "read_gbps": float(c["read_gbps"]) if c.get("read_gbps") else None}
    written = [p for p in (plot_prefill(rows, ceil, c["gpu"], out), plot_decode(rows, ceil, c["gpu"], out)) if p]
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
