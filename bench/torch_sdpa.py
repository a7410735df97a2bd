#!/usr/bin/env python3
"""PyTorch's attention on the ladder's grids, on this GPU: the figures the chapters are held to.

    python3 bench/torch_sdpa.py OUT_DIR [--quick]

Times torch.nn.functional.scaled_dot_product_attention per backend (flash = FlashAttention-2,
cudnn, efficient) and an unfused eager attention (matmul, softmax, matmul), with the lab's method:
CUDA events around the call only, L2 flushed before every repetition (by reading a buffer of twice
its size: flush_l2), median of repetitions,
FLOPs = 4 * b * hq * (visible query-key pairs) * d, bytes = Q + K + V + O once. Each output is
checked against an fp32 eager computation on its first (batch, head) pairs. Writes
OUT_DIR/torch_sdpa.csv with the ladder's columns (chapter = "pytorch", variant = backend).
Needs PyTorch with CUDA; nothing else.
"""
import csv
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def prefill_grid(quick):
    for d in (64, 128):
        for causal in (False, True):
            for s in (512, 1024, 2048, 4096, 8192, 16384):
                if quick and s not in (1024, 4096):
                    continue
                yield "prefill", 16384 // s, 2048 // d, 2048 // d, s, s, d, causal


def decode_grid(quick):
    for hkv in (32, 8):
        for b, kv in ((1, 1024), (1, 8192), (1, 32768), (8, 4096), (32, 4096), (128, 1024),
                      (128, 4096), (64, 16384)):
            if quick and (b, kv) not in ((1, 32768), (8, 4096)):
                continue
            yield "decode", b, 32, hkv, 1, kv, 128, False


def visible_pairs(sq, sk, causal):
    if not causal:
        return sq * sk
    return sum(min(max(i + sk - sq + 1, 0), sk) for i in range(sq))


def eager(q, k, v, causal, scale):
    # q, k, v: [b, h, s, d]; GQA by repeating K/V heads, as an unfused implementation would.
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


FLUSH_WRITES = os.environ.get("LAB_L2_FLUSH") == "write"


def flush_l2(buf):
    """The lab's L2 flush (common/measure.h): read a buffer of twice the L2 size, which leaves the
    L2 full of clean lines. LAB_L2_FLUSH=write writes it instead (buf.zero_()), which leaves dirty
    lines that the timed call then pays to write back as it evicts them."""
    if FLUSH_WRITES:
        buf.zero_()
    else:
        buf.sum()


def time_ms(fn, flush, reps=30, warmup=3, budget_s=1.0):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while len(times) < reps:
        flush_l2(flush)
        # Keep the GPU busy while Python enqueues the call, so the events time the GPU work only.
        torch.cuda._sleep(100_000)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if len(times) >= 3 and sum(times) > budget_s * 1e3:
            break
    return statistics.median(times), len(times)


def ceilings():
    n = 1 << 30
    src = torch.randn(n // 2, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    flush = torch.zeros(1, device="cuda")
    copy_ms, _ = time_ms(lambda: dst.copy_(src), flush, reps=20, budget_s=2)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    gemm_ms, _ = time_ms(lambda: torch.matmul(a, b), flush, reps=20, budget_s=2)
    return 2 * n / (copy_ms * 1e-3) / 1e9, 2 * 8192 ** 3 / (gemm_ms * 1e-3) / 1e12


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out, quick = sys.argv[1], "--quick" in sys.argv
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    copy_gbps, gemm_tflops = ceilings()
    print(f"{gpu}: copy {copy_gbps:.0f} GB/s, fp16 GEMM {gemm_tflops:.1f} TFLOPS (torch {torch.__version__})")
    flush = torch.zeros(int(torch.cuda.get_device_properties(0).L2_cache_size) // 2, device="cuda")
    rows = []
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    for workload, b, hq, hkv, sq, sk, d, causal in list(prefill_grid(quick)) + list(decode_grid(quick)):
        q = torch.randn(b, hq, sq, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.float16)
        scale = d ** -0.5
        nh = min(2, hq)
        ref = eager(q[:1, :nh].float(), k[:1, : max(1, nh * hkv // hq)].float(),
                    v[:1, : max(1, nh * hkv // hq)].float(), causal, scale)
        flops = 4.0 * b * hq * visible_pairs(sq, sk, causal) * d
        nbytes = 2.0 * (2 * b * hq * sq * d + 2 * b * hkv * sk * d)
        # FlashAttention aligns causal bottom-right for sq != sk; SDPA's is_causal is top-left, so
        # causal runs here only where sq == sk (the prefill grid).
        variants = {name: (lambda be=be: sdpa(q, k, v, causal, scale, be)) for name, be in BACKENDS.items()}
        if workload == "prefill" and sq <= 4096:
            variants["eager_unfused"] = lambda: eager(q, k, v, causal, scale)
        for name, fn in variants.items():
            try:
                o = fn()
                torch.cuda.synchronize()
            except Exception as e:  # backend does not support this shape on this GPU
                print(f"{workload} {name:14s} b{b} h{hq}/{hkv} sq{sq} sk{sk} d{d} causal={int(causal)}: unsupported ({str(e).splitlines()[0][:80]})")
                continue
            err = (o[:1, :nh].float() - ref).abs()
            max_err, rel = err.max().item(), (err.norm() / ref.norm()).item()
            ms, reps = time_ms(fn, flush)
            tflops, gbps = flops / (ms * 1e-3) / 1e12, nbytes / (ms * 1e-3) / 1e9
            bound = "compute" if flops / nbytes > gemm_tflops * 1e12 / (copy_gbps * 1e9) else "memory"
            pct = 100 * (tflops / gemm_tflops if bound == "compute" else gbps / copy_gbps)
            print(f"{workload} {name:14s} b{b} h{hq}/{hkv} sq{sq} sk{sk} d{d} causal={int(causal)}: "
                  f"{ms:8.4f} ms {tflops:6.1f} TFLOPS {gbps:6.0f} GB/s  rel_err {rel:.1e}", flush=True)
            rows.append(dict(workload=workload, chapter="pytorch", variant=name, dtype="fp16", batch=b,
                             heads_q=hq, heads_kv=hkv, seqlen_q=sq, seqlen_kv=sk, head_dim=d,
                             causal=int(causal), ms=f"{ms:.5f}", reps=reps, tflops=f"{tflops:.2f}",
                             gbps=f"{gbps:.1f}", pct_peak=f"{pct:.2f}", bound=bound,
                             max_err=f"{max_err:.3e}", rel_err=f"{rel:.3e}", gpu=gpu,
                             torch=torch.__version__, cuda=torch.version.cuda, date=date,
                             copy_gbps=f"{copy_gbps:.0f}", gemm_tflops=f"{gemm_tflops:.1f}"))
        del q, k, v
    with open(os.path.join(out, "torch_sdpa.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {os.path.join(out, 'torch_sdpa.csv')}")


def sdpa(q, k, v, causal, scale, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


if __name__ == "__main__":
    main()
