#!/usr/bin/env python3
"""The lab's chapters and PyTorch's attention backends on the same tensors, in one process.

    python3 bench/compare_torch.py OUT_DIR [--quick] [--grid prefill|decode|all] [--only 03,01]
                                           [--max-seconds S]

For every shape of the standard grids (bench/torch_sdpa.py, the same as bench/ladder.cu) it times
each variant of each chapter in liblab_attention.so (through python/lab) and
scaled_dot_product_attention's flash (FlashAttention-2), cuDNN and memory-efficient backends, with
the lab's method: CUDA events around the call only (the lab call is prepared beforehand, so only
the launch is inside), L2 flushed before every repetition by reading a buffer of twice its size,
median of repetitions, FLOPs = 4 b hq (visible pairs) d, bytes = Q + K + V + O once. Tensors are
in FlashAttention's [batch, seqlen, heads, head_dim] layout; SDPA gets them as [b, h, s, d] views.

Every lab output is validated before timing, and again after timing from a poisoned output,
against an fp32 computation on its first (batch, head) pairs with the lab's tolerances; a failure
is reported and makes the exit code 1. Writes OUT_DIR/compare_torch.csv (torch_sdpa.csv's columns;
chapter = the lab's chapter directory or "pytorch", variant = the lab variant or the backend) and
OUT_DIR/compare.png. Needs PyTorch with CUDA, matplotlib and the built library (LAB_ATTENTION_LIB,
else build/ or build-gpu/).
"""
import argparse
import csv
import datetime
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))

import torch  # noqa: E402

import lab  # noqa: E402
import torch_sdpa  # noqa: E402  (the grids, the timing routine, the ceilings, the SDPA call)


def tolerance(dtype):
    """common/validate.cpp: max |err| <= 8 eps max(1, max |ref|), ||err|| / ||ref|| <= 2 eps."""
    eps = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    return 8 * eps, 2 * eps


def check(o_bshd, ref, nh):
    """Error of o's first (batch, head) pairs against ref [1, nh, sq, d]: (ok, max_err, rel_err, why)."""
    got = o_bshd[:1, :, :nh].transpose(1, 2).float()
    if not torch.isfinite(got).all():
        return False, float("nan"), float("nan"), "NaN/Inf or unwritten elements"
    err = (got - ref).abs()
    max_err, max_ref = err.max().item(), ref.abs().max().item()
    ref_norm = ref.norm().item()
    rel = err.norm().item() / ref_norm if ref_norm > 0 else err.norm().item()
    tol_abs, tol_rel = tolerance(o_bshd.dtype)
    if max_err > tol_abs * max(1.0, max_ref):
        return False, max_err, rel, f"max_abs {max_err:.2e} > {tol_abs * max(1.0, max_ref):.2e}"
    if rel > tol_rel:
        return False, max_err, rel, f"rel_l2 {rel:.2e} > {tol_rel:.2e}"
    return True, max_err, rel, ""


def lab_entries(only):
    entries = lab.variants()
    if only:
        wanted = only.split(",")
        entries = [e for e in entries if any(e["chapter"] == w or e["chapter"].startswith(w + "_") for w in wanted)]
    return entries


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder for compare_torch.csv and compare.png")
    ap.add_argument("--quick", action="store_true", help="two shapes per table instead of the whole grid")
    ap.add_argument("--grid", choices=("prefill", "decode", "all"), default="all")
    ap.add_argument("--only", default="", help="lab chapters to run, e.g. 03 or 01_naive,03 (default: all)")
    ap.add_argument("--max-seconds", type=float, default=1.0, help="timing budget per configuration")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compare_torch: no CUDA device")
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    entries = lab_entries(args.only)
    print(f"lab library: {lab.library_path()}; {len(entries)} lab variants")
    copy_gbps, gemm_tflops = torch_sdpa.ceilings()
    read_gbps = lab.read_ceiling_gbps()  # the lab's streaming read: what decoding rows are a % of
    print(f"{gpu}: streaming read {read_gbps:.0f} GB/s (the lab's), copy {copy_gbps:.0f} GB/s, "
          f"fp16 GEMM {gemm_tflops:.1f} TFLOPS (torch {torch.__version__})")
    flush = torch.zeros(int(torch.cuda.get_device_properties(0).L2_cache_size) // 2, device="cuda")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    configs = []
    if args.grid != "decode":
        configs += list(torch_sdpa.prefill_grid(args.quick))
    if args.grid != "prefill":
        configs += list(torch_sdpa.decode_grid(args.quick))

    rows, failures = [], []
    for workload, b, hq, hkv, sq, sk, d, causal in configs:
        shape = f"{workload} b{b} h{hq}/{hkv} sq{sq} sk{sk} d{d} causal={int(causal)}"
        # FlashAttention's layout for everyone; SDPA reads the same memory through [b, h, s, d] views.
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.float16)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        scale = d ** -0.5
        nh = min(2, hq)
        nkv = max(1, nh * hkv // hq)
        ref = torch_sdpa.eager(qt[:1, :nh].float(), kt[:1, :nkv].float(), vt[:1, :nkv].float(), causal, scale)
        flops = 4.0 * b * hq * torch_sdpa.visible_pairs(sq, sk, causal) * d
        nbytes = 2.0 * (2 * b * hq * sq * d + 2 * b * hkv * sk * d)

        def record(chapter, variant, ms, reps, max_err, rel):
            tflops, gbps = flops / (ms * 1e-3) / 1e12, nbytes / (ms * 1e-3) / 1e9
            bound = "compute" if flops / nbytes > gemm_tflops * 1e12 / (read_gbps * 1e9) else "memory"
            pct = 100 * (tflops / gemm_tflops if bound == "compute" else gbps / read_gbps)
            name = f"pytorch {variant}" if chapter == "pytorch" else chapter + ("/" + variant if variant else "")
            print(f"{shape:44s} {name:22s} {ms:8.4f} ms {tflops:6.1f} TFLOPS {gbps:6.0f} GB/s  rel_err {rel:.1e}",
                  flush=True)
            rows.append(dict(workload=workload, chapter=chapter, variant=variant, dtype="fp16", batch=b,
                             heads_q=hq, heads_kv=hkv, seqlen_q=sq, seqlen_kv=sk, head_dim=d,
                             causal=int(causal), ms=f"{ms:.5f}", reps=reps, tflops=f"{tflops:.2f}",
                             gbps=f"{gbps:.1f}", pct_peak=f"{pct:.2f}", bound=bound,
                             max_err=f"{max_err:.3e}", rel_err=f"{rel:.3e}", gpu=gpu,
                             torch=torch.__version__, cuda=torch.version.cuda, date=date,
                             read_gbps=f"{read_gbps:.0f}", copy_gbps=f"{copy_gbps:.0f}",
                             gemm_tflops=f"{gemm_tflops:.1f}"))

        for e in entries:
            name = e["chapter"] + ("/" + e["variant"] if e["variant"] else "")
            try:
                call = lab.prepare(q, k, v, chapter=e["chapter"], variant=e["variant"], causal=causal,
                                   out=torch.empty_like(q))
                call.out.fill_(float("nan"))  # poisoned: an element the chapter does not write fails
                call.run()
                torch.cuda.synchronize()
            except lab.InvalidArgument as x:  # the chapter refuses this shape, by name
                print(f"{shape:44s} {name:22s} skipped: {x}")
                continue
            except torch.cuda.OutOfMemoryError as x:  # 01_naive's S at the longest sequences, for example
                print(f"{shape:44s} {name:22s} skipped: {str(x).splitlines()[0][:100]}")
                call = None
                torch.cuda.empty_cache()
                continue
            except lab.CudaError as x:
                failures.append(f"{shape} {name}: {x}")
                print(f"{shape:44s} {name:22s} FAILED: {x}")
                continue
            ok, max_err, rel, why = check(call.out, ref, nh)
            if ok:
                ms, reps = torch_sdpa.time_ms(call.run, flush, budget_s=args.max_seconds)
                call.out.fill_(float("nan"))  # and once more after timing, from a poisoned output
                call.run()
                ok, max_err_after, rel_after, why = check(call.out, ref, nh)
                max_err, rel = max(max_err, max_err_after), max(rel, rel_after)
                why = why and "after timing: " + why
            if not ok:
                failures.append(f"{shape} {name}: {why}")
                print(f"{shape:44s} {name:22s} FAILED: {why}")
            else:
                record(e["chapter"], e["variant"], ms, reps, max_err, rel)
            del call

        for backend in torch_sdpa.BACKENDS:
            def fn(backend=backend):
                return torch_sdpa.sdpa(qt, kt, vt, causal, scale, torch_sdpa.BACKENDS[backend])
            try:
                o = fn()
                torch.cuda.synchronize()
            except Exception as x:  # the backend does not support this shape on this GPU
                print(f"{shape:44s} pytorch {backend:14s} unsupported ({str(x).splitlines()[0][:80]})")
                continue
            # PyTorch's error is recorded, not held to the lab's tolerance: its kernels are the yardstick.
            _, max_err, rel, _ = check(o.transpose(1, 2), ref, nh)
            ms, reps = torch_sdpa.time_ms(fn, flush, budget_s=args.max_seconds)
            record("pytorch", backend, ms, reps, max_err, rel)
        del q, k, v, qt, kt, vt

    path = os.path.join(args.out, "compare_torch.csv")
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {len(rows)} rows to {path}")
        png = plot(rows, gpu, read_gbps, gemm_tflops, args.out)
        if png:
            print(f"wrote {png}")
    for f in failures:
        print("FAILED: " + f)
    print(f"compare_torch: {len(rows)} rows, {len(failures)} failed checks")
    return 1 if failures or not rows else 0


def plot(rows, gpu, read_gbps, gemm_tflops, out):
    """One panel per table: prefill TFLOPS against sequence length, decode GB/s per (batch, KV length).
    Lab variants solid, PyTorch's backends dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r):
        return ("pytorch " if r["chapter"] == "pytorch" else r["chapter"] + ("/" if r["variant"] else "")) + r["variant"]

    panels = []
    for d, causal in sorted({(r["head_dim"], r["causal"]) for r in rows if r["workload"] == "prefill"}):
        panels.append(("prefill", f"prefill fp16, d={d}, {'causal' if causal else 'full'}",
                       [r for r in rows if r["workload"] == "prefill" and (r["head_dim"], r["causal"]) == (d, causal)]))
    for hq, hkv in sorted({(r["heads_q"], r["heads_kv"]) for r in rows if r["workload"] == "decode"}, reverse=True):
        panels.append(("decode", f"decode fp16, d=128, heads {hq}/{hkv}",
                       [r for r in rows if r["workload"] == "decode" and (r["heads_q"], r["heads_kv"]) == (hq, hkv)]))
    if not panels:
        return None
    cols = min(3, len(panels))
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(6 * cols, 4.8 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (workload, title, sel) in zip(axes.flat, panels):
        if workload == "prefill":
            metric, ceiling, unit = "tflops", gemm_tflops, "TFLOPS"
        else:  # decode shapes side by side, in (batch, KV length) order
            shapes = sorted({(r["batch"], r["seqlen_kv"]) for r in sel})
            metric, ceiling, unit = "gbps", read_gbps, "GB/s (Q + K + V + O bytes, each once)"
        lines = {}
        for r in sel:
            x = r["seqlen_q"] if workload == "prefill" else shapes.index((r["batch"], r["seqlen_kv"]))
            lines.setdefault(label(r), []).append((x, float(r[metric])))
        for name in sorted(lines, key=lambda n: (n.startswith("pytorch"), n)):
            pts = sorted(lines[name])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle="--" if name.startswith("pytorch") else "-")
        ax.axhline(ceiling, color="black", linestyle=":", linewidth=1, label=f"measured ceiling ({ceiling:.0f})")
        if workload == "prefill":
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (batch = 16k / seqlen)")
        else:
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"b{b}\nkv{k // 1024}k" if k >= 1024 else f"b{b}\nkv{k}" for b, k in shapes],
                               fontsize=8)
            ax.set_xlabel("batch and KV length")
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"The lab's chapters and PyTorch's attention, same run, same tensors ({gpu})")
    fig.tight_layout()
    path = os.path.join(out, "compare.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
