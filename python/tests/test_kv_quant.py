"""07_kv_quant through the C interface: int8 and FP8 KV caches made by lab.quantize_kv, read by lab.forward.

    LAB_ATTENTION_LIB=build/lib/liblab_attention.so python3 -m pytest -q python/tests/test_kv_quant.py

The codes and fp16 scales are dequantized here, in PyTorch (in float32, from the stored fp16 scale
values), following common/attn.h's layouts; the kernel's output is compared with
scaled_dot_product_attention in fp32 on those dequantized K/V (the
kernel's own error, with the lab's fp16 tolerance), on every scheme 07 lists and the shapes it
supports (decode, GQA/MQA, cache_seqlens, paged KV, split counts). The error against the original
fp16 K/V, which is the quantization's, is only printed: how large it may be depends on the inputs.
Tests that need only the library (the support table, the C API's refusals) run wherever it is
built; the rest are skipped without PyTorch, a GPU or the library.
"""
import ctypes
import re
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lab  # noqa: E402
from test_chapters import (SEED, VARIANTS, assert_matches, c_call, cuda, input_tensor,  # noqa: E402,F401
                           needs_library, paged, poisoned_like, reference, torch, valid_c_params)

# The caches 07 reads: (scheme, group_size), as its own variants name them (int8_group32, ...).
SCHEMES = [("int8_tensor", 0), ("int8_token", 0), ("int8_head", 0), ("int8_group", 32), ("int8_group", 64),
           ("fp8_e4m3", 0), ("fp8_e5m2", 0), ("fp8_e4m3_head", 0)]
SCHEME_IDS = [s + (str(g) if g else "") for s, g in SCHEMES]


# ---- the library alone (no PyTorch, no GPU): runs in CI ----

@needs_library
def test_support_lists_07s_schemes_and_no_other_chapter_reads_a_quantized_cache():
    # Two steps (the fast kernel, the default, and step 1); the scheme is a field of the call.
    assert lab.chapters()["07_kv_quant"] == ["", "dequant"]
    assert lab.support("07", "dequant") == lab.support("07")
    s = lab.support("07")
    assert s["kv_schemes"] == list(lab.KV_SCHEMES)  # "none" (its fp16 baseline) and every scheme
    assert s["kv_group_sizes"] == [32, 64]
    assert s["max_seqlen_q"] == 1 and s["gqa"] and s["cache_seqlens"] and s["paged_kv"] and s["splits"]
    for e in VARIANTS:
        if e["chapter"] != "07_kv_quant":
            assert e["support"]["kv_schemes"] == ["none"] and e["support"]["kv_group_sizes"] == [], e


@needs_library
def test_scheme_names_match_the_library():
    lib = lab.load_library()
    for name, value in lab.KV_SCHEMES.items():
        assert lib.lab_kv_scheme_name(value).decode() == name
    assert lib.lab_kv_scheme_name(len(lab.KV_SCHEMES)) is None and lib.lab_kv_scheme_name(-1) is None


def quantized_c_params(scheme, group_size=0, head_dim=64):
    """A decoding problem over a 1-byte cache (fake, aligned, never dereferenced pointers)."""
    p = valid_c_params(head_dim=head_dim, seqlen_q=1)
    p.kv_scheme, p.kv_group_size = lab.KV_SCHEMES[scheme], group_size
    if scheme not in ("none", "fp8_e4m3", "fp8_e5m2"):
        p.kv_k_scale, p.kv_v_scale = 0x50000, 0x60000
    return p


def gpu_present():
    """Whether this machine has a GPU the driver sees (no PyTorch needed): libcuda loads and counts
    at least one device. Without a driver or a device the library's CUDA calls fail by design."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


@needs_library
@pytest.mark.parametrize("function", ["forward", "workspace"])
@pytest.mark.parametrize("entry", [pytest.param(e, id=e["chapter"] + ("/" + e["variant"] if e["variant"] else ""))
                                   for e in VARIANTS if e["chapter"] != "07_kv_quant"] or
                         [pytest.param(None, marks=pytest.mark.skip(reason="liblab_attention.so is not built"))])
def test_c_api_other_chapters_refuse_a_quantized_cache_by_name(entry, function):
    s = entry["support"]
    p = quantized_c_params("int8_head", head_dim=s["head_dims"][0] if s["head_dims"] else 64)
    rc, message, _ = c_call(function, entry["chapter"], entry["variant"], p)
    assert rc == 1, message
    assert "kv_quant.scheme = int8_head is not supported" in message and entry["chapter"] in message, message


@needs_library
def test_c_api_07_accepts_its_schemes_and_refuses_by_name():
    for scheme, group_size in SCHEMES:
        # Accepted: the checks pass, then the split count is sized for the device. Where there is
        # no GPU (CI) that is a CUDA error saying so; any other CUDA error is a failure.
        rc, message, _ = c_call("workspace", "07", None, quantized_c_params(scheme, group_size))
        if rc == 3 and not gpu_present():
            assert re.search(r"no CUDA-capable device|cudaErrorNoDevice|cudaErrorInsufficientDriver", message), message
        else:
            assert rc == 0, f"{scheme}{group_size or ''}: rc {rc}: {message}"
    refusals = [  # (scheme, group_size, a field to break or None, what the message must say)
        ("int8_group", 16, None, "kv_quant.group_size = 16 is not supported (supported: 32, 64)"),
        ("int8_head", 32, None, "kv_quant.group_size = 32 is only used by int8_group"),
        ("int8_head", 0, "kv_k_scale", "kv_quant.k_scale is a null pointer"),
        ("fp8_e4m3", 0, "give_scales", "has no scales"),
        ("int8_head", 0, "k_row_stride", "k_row_stride = 264 is not a multiple of 16"),
        ("int8_group", 32, "odd_scale", "kv_quant scale pointers must be 2-byte aligned (fp16 scales)"),
    ]
    for scheme, group_size, field, expected in refusals:
        p = quantized_c_params(scheme, group_size)
        if field == "give_scales":
            p.kv_k_scale, p.kv_v_scale = 0x50000, 0x60000
        elif field == "odd_scale":
            p.kv_v_scale = 0x60001  # fp16 scales need 2-byte alignment (2-byte aligned is accepted above)
        elif field == "k_row_stride":
            p.k_row_stride = 264  # 16-byte rows of codes: a multiple of 16 bytes
        elif field:
            setattr(p, field, None)
        for function in ("forward", "workspace"):
            rc, message, _ = c_call(function, "07_kv_quant", None, p)
            assert rc == 1 and expected in message and "07_kv_quant" in message, (scheme, field, message)
    p = quantized_c_params("none")
    p.kv_scheme = 99
    rc, message, _ = c_call("forward", "07", None, p)
    assert rc == 1 and "kv_quant.scheme = 99 is unknown" in message, message


@needs_library
def test_c_api_refuses_callers_built_for_fp32_scales():
    """ABI 3 passed fp32 scales: the same params with abi_version 3 are refused, never read as fp16."""
    assert lab.ABI_VERSION >= 4 and lab.load_library().lab_abi_version() == lab.ABI_VERSION
    p = quantized_c_params("int8_head")
    p.abi_version = 3
    for function in ("forward", "workspace"):
        rc, message, _ = c_call(function, "07", None, p)
        assert rc == 1 and f"abi_version = 3 does not match the library's {lab.ABI_VERSION}" in message, message
    rc, message, n = scale_bytes(p, "int8_head", 0)
    assert rc == 1 and n == 0 and "abi_version = 3" in message, message


def scale_bytes(p, scheme, group_size):
    lib = lab.load_library()
    n = ctypes.c_size_t(12345)
    rc = lib.lab_kv_scale_bytes(ctypes.byref(p), lab.KV_SCHEMES[scheme], group_size, ctypes.byref(n))
    return rc, lib.lab_last_error().decode(), n.value


@needs_library
def test_c_api_sizes_the_scales_as_attn_h_lays_them_out():
    p = valid_c_params(head_dim=64)  # batch 2, seqlen_kv 65, heads_kv 4
    slots, rows, h, d = 2, 65, 4, 64
    paged_p = valid_c_params(head_dim=64)
    paged_p.block_table, paged_p.num_pages, paged_p.page_size, paged_p.max_pages_per_seq = 0x70000, 7, 16, 3
    want = {"int8_tensor": 1, "int8_token": slots * rows, "int8_head": slots * h * rows,
            "int8_group32": slots * h * rows * d // 32, "int8_group64": slots * h * rows * d // 64,
            "fp8_e4m3": 0, "fp8_e5m2": 0, "fp8_e4m3_head": h}
    pages, page_size = 7, 16  # paged: slots are pages, rows their tokens
    want_paged = {"int8_tensor": 1, "int8_token": pages * page_size, "int8_head": pages * h * page_size,
                  "int8_group32": pages * h * page_size * d // 32, "int8_group64": pages * h * page_size * d // 64,
                  "fp8_e4m3": 0, "fp8_e5m2": 0, "fp8_e4m3_head": h}
    for (scheme, group_size), name in zip(SCHEMES, SCHEME_IDS):
        rc, message, n = scale_bytes(p, scheme, group_size)
        assert (rc, n) == (0, 2 * want[name]), f"{name}: {message}"  # fp16: 2 bytes per scale
        rc, message, n = scale_bytes(paged_p, scheme, group_size)
        assert (rc, n) == (0, 2 * want_paged[name]), f"paged {name}: {message}"
    for scheme, group_size, head_dim, expected in (
            ("none", 0, 64, "kv_scheme = none cannot be quantized into"),
            ("int8_group", 48, 64, "kv_group_size = 48 is not supported"),
            ("int8_group", 64, 32, "kv_group_size = 64 does not divide head_dim = 32"),
            ("int8_head", 0, 72, "head_dim = 72 is not supported by the quantizer")):
        q = valid_c_params(head_dim=head_dim)
        rc, message, n = scale_bytes(q, scheme, group_size)
        assert rc == 1 and n == 0 and expected in message, message


@needs_library
def test_c_api_quantize_refuses_by_name_before_touching_the_gpu():
    lib = lab.load_library()
    scales = (0x50000, 0x60000)

    def quantize(p, scheme="int8_head", group_size=0, codes=(0x80000, 0x90000), scale=scales):
        rc = lib.lab_kv_quantize(ctypes.byref(p), lab.KV_SCHEMES[scheme], group_size, codes[0], codes[1],
                                 scale[0], scale[1], None)
        return rc, lib.lab_last_error().decode()

    cases = []
    p = valid_c_params()
    p.v_row_stride *= 2
    cases.append((p, {}, "v's strides (16640, 512, 64) differ from k's (16640, 256, 64)"))
    cases.append((valid_c_params(), dict(codes=(None, 0x90000)), "k_codes is a null pointer"))
    cases.append((valid_c_params(), dict(codes=(0x80008, 0x90000)), "k_codes pointer is not 16-byte aligned"))
    cases.append((valid_c_params(), dict(scale=(0x50000, None)), "v_scale is a null pointer"))
    cases.append((valid_c_params(), dict(scale=(0x50001, 0x60000)),
                  "k_scale/v_scale pointers must be 2-byte aligned"))
    cases.append((valid_c_params(), dict(scheme="fp8_e5m2"), "k_scale/v_scale are given but fp8_e5m2"))
    p = valid_c_params()
    p.dtype = lab.DTYPE_BF16
    cases.append((p, {}, "the quantizer reads an fp16 KV cache"))
    p = valid_c_params()
    p.kv_scheme = lab.KV_SCHEMES["int8_head"]
    cases.append((p, {}, "the quantizer reads an fp16 KV cache"))
    p = valid_c_params()
    p.seqlen_kv = 0
    cases.append((p, {}, "seqlen_kv = 0 must be > 0"))
    for p, kw, expected in cases:
        rc, message = quantize(p, **kw)
        assert rc == 1 and expected in message and "07_kv_quant" in message, (expected, message)


def test_unknown_scheme_names_are_refused_in_python():
    """No library, PyTorch or GPU needed: the name is checked first."""
    with pytest.raises(ValueError, match=r"kv_scheme = 'int4_head' is unknown \(known: 'none', 'int8_tensor'"):
        lab.forward(None, None, None, chapter="07", kv_scheme="int4_head")
    with pytest.raises(ValueError, match=r"scheme = 'int8_group32' is unknown"):
        lab.quantize_kv(None, None, scheme="int8_group32")  # the group size is its own argument


# ---- on the GPU ----

def dequantize(torch, codes, scale, scheme, group_size):
    """common/attn.h: an element is code * scale (int8), or the FP8 number (times its head's scale)."""
    x = codes.float()  # int8, or PyTorch's FP8 dtype: their values
    if scale is not None:
        assert scale.dtype == torch.float16, f"{scheme}: scales are {scale.dtype}, not fp16"
        scale = scale.float()  # the stored fp16 values, exactly, as the kernel reads them
    if scheme == "int8_tensor":
        return x * scale[0]
    if scheme == "int8_token":  # [slots][rows]
        return x * scale[:, :, None, None]
    if scheme == "int8_head":  # [slots][heads_kv][rows]
        return x * scale.permute(0, 2, 1)[..., None]
    if scheme == "int8_group":  # [slots][heads_kv][rows][head_dim / group_size]
        return x * scale.permute(0, 2, 1, 3).repeat_interleave(group_size, dim=-1)
    if scheme == "fp8_e4m3_head":  # [heads_kv]
        return x * scale[None, None, :, None]
    return x


def quantized(torch, k, v, scheme, group_size):
    """(k codes, v codes, k scale, v scale, dequantized k, dequantized v)."""
    if scheme.startswith("fp8") and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip(f"this PyTorch ({torch.__version__}) has no FP8 dtypes to read {scheme} codes with")
    kc, vc, ks, vs = lab.quantize_kv(k, v, scheme, group_size)
    return kc, vc, ks, vs, dequantize(torch, kc, ks, scheme, group_size), dequantize(torch, vc, vs, scheme, group_size)


@pytest.mark.parametrize("scheme,group_size", SCHEMES, ids=SCHEME_IDS)
def test_quantize_kv_follows_the_rules(cuda, scheme, group_size):
    """Every element within the scheme's rounding error; scales = amax / 127 (448) of what they cover,
    rounded up to fp16: the smallest fp16 value >= amax / 127 in fp32, so no code clips."""
    torch = cuda
    torch.manual_seed(SEED)
    k, v = (input_tensor(torch, (3, 257, 4, 128), torch.float16, outliers=True) for _ in range(2))
    k[1, :, 2] = 0  # an all-zero head: its scales are 1, its codes 0
    kc, vc, ks, vs, kd, vd = quantized(torch, k, v, scheme, group_size)
    assert kc.shape == k.shape and kc.stride() == k.stride() and kc.element_size() == 1
    assert (ks is None) == (scheme in ("fp8_e4m3", "fp8_e5m2"))

    def check_rounded_up(scale, amax, divisor):
        assert scale.dtype == torch.float16 and scale.shape == amax.shape
        # amax / divisor in fp32 as the library computes it (IEEE division; PyTorch's division by a
        # scalar multiplies by its reciprocal, which may differ in the last bit), before rounding.
        want = torch.where(amax > 0, (amax.double() / divisor).float(), torch.ones_like(amax))
        bits = scale.view(torch.int16)
        assert (bits >= 1).all() and torch.isfinite(scale).all(), f"{scheme}: a scale is 0, negative or not finite"
        assert (scale.float() >= want).all(), f"{scheme}: a scale below amax / {divisor}"
        below = (bits - 1).view(torch.float16).float()  # the next fp16 value down
        assert ((below < want) | (bits == 1)).all(), f"{scheme}: a scale more than one fp16 step above"
        assert (scale.double() * divisor >= amax.double()).all(), f"{scheme}: an element would clip"

    for x, codes, scale, deq in ((k, kc, ks, kd), (v, vc, vs, vd)):
        x = x.float()
        err = (deq - x).abs()
        if scheme.startswith("int8"):
            amax = {"int8_tensor": lambda: x.abs().amax().view(1),
                    "int8_token": lambda: x.abs().amax(dim=(2, 3)),
                    "int8_head": lambda: x.abs().amax(dim=3).permute(0, 2, 1),
                    "int8_group": lambda: x.abs().unflatten(3, (-1, max(group_size, 1))).amax(dim=4).permute(0, 2, 1, 3),
                    }[scheme]()
            check_rounded_up(scale, amax, 127)
            assert codes.abs().max().item() <= 127
            half_step = dequantize(torch, torch.ones_like(codes), scale, scheme, group_size) / 2
            assert (err <= half_step * (1 + 1e-3)).all(), f"{scheme}: an element off by more than half a step"
        else:  # round to nearest even: half a unit in the last place (2^-4 E4M3, 2^-3 E5M2) or the subnormal step
            rel, tiny = (2.0 ** -3, 2.0 ** -17) if scheme == "fp8_e5m2" else (2.0 ** -4, 2.0 ** -10)
            unit = scale.float()[None, None, :, None] if scheme == "fp8_e4m3_head" else 1.0
            if scheme == "fp8_e4m3_head":
                amax = x.abs().amax(dim=(0, 1, 3))  # [heads_kv]: over every slot, row and channel
                check_rounded_up(scale, amax, 448)
            assert (err <= (rel * x.abs() + tiny * unit) * (1 + 1e-5)).all(), f"{scheme}: rounding error too large"
    assert (kd[1, :, 2] == 0).all(), f"{scheme}: an all-zero head must stay 0"


def decode_problem(torch, b, hq, hkv, sk, d, seed):
    torch.manual_seed(seed)
    q = input_tensor(torch, (b, 1, hq, d), torch.float16)
    k = input_tensor(torch, (b, sk, hkv, d), torch.float16, outliers=True)
    v = input_tensor(torch, (b, sk, hkv, d), torch.float16, outliers=True)
    return q, k, v


def check_against_both(torch, what, o, o_lse, q, kd, vd, k, v, errors, **ref_kw):
    """The kernel's error on the dequantized K/V (asserted) and the quantization's on the original (kept)."""
    ref, ref_lse = reference(torch, q, kd, vd, causal=False, scale=q.shape[-1] ** -0.5, **ref_kw)
    assert_matches(torch, o, ref, torch.float16, what, o_lse, ref_lse if o_lse is not None else None)
    orig, _ = reference(torch, q, k, v, causal=False, scale=q.shape[-1] ** -0.5, **ref_kw)
    rel = ((o.float() - orig).norm() / orig.norm().clamp_min(1e-30)).item()
    assert rel == rel and rel != float("inf"), f"{what}: error against the fp16 K/V is not finite"
    errors.append((what, rel))


def report(scheme, errors):
    print(f"\n07_kv_quant {scheme}: rel L2 error of the output against attention on the original fp16 K/V")
    for what, rel in errors:
        print(f"  {what:40s} {rel:.2e}")


@pytest.mark.parametrize("variant", [None, "dequant"], ids=["kernel", "dequant"])
@pytest.mark.parametrize("scheme,group_size", SCHEMES, ids=SCHEME_IDS)
def test_decode_matches_sdpa_on_the_dequantized_cache(cuda, scheme, group_size, variant):
    """Decode (seqlen_q = 1): MHA, GQA 32/8 and MQA, head_dim 64/128/256, seqlen_kv 1 to 4097, with lse."""
    torch = cuda
    errors = []
    for b, hq, hkv, sk, d in ((1, 32, 32, 4097, 128), (3, 32, 8, 1000, 128), (2, 8, 1, 333, 256),
                              (4, 16, 4, 1, 64), (200, 4, 2, 65, 64)):
        q, k, v = decode_problem(torch, b, hq, hkv, sk, d, SEED + sk + d)
        kc, vc, ks, vs, kd, vd = quantized(torch, k, v, scheme, group_size)
        o, o_lse = lab.forward(q, kc, vc, chapter="07", variant=variant, kv_scheme=scheme, kv_group_size=group_size,
                               k_scale=ks, v_scale=vs, lse=True, out=poisoned_like(torch, q))
        check_against_both(torch, f"{variant or ''} {scheme}{group_size or ''} b{b} h{hq}/{hkv} sk{sk} d{d}", o, o_lse, q, kd, vd,
                           k, v, errors)
    report(scheme, errors)


@pytest.mark.parametrize("paged_kv", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("scheme,group_size", SCHEMES, ids=SCHEME_IDS)
def test_cache_seqlens_and_paged_kv(cuda, scheme, group_size, paged_kv):
    """A cache with per-sequence lengths (0 included), dense or in shuffled pages, quantized as stored."""
    torch = cuda
    lens, hq, hkv, d = [1, 4096, 777, 0], 32, 8, 128
    q, k, v = decode_problem(torch, len(lens), hq, hkv, 4096, d, SEED + 7)
    cache_seqlens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    kw = dict(cache_seqlens=cache_seqlens)
    k_in, v_in = k, v
    if paged_kv:
        # The unused pages hold 100.0: they enter the static scales (int8_tensor, fp8_e4m3_head),
        # never the output.
        k_in, v_in, kw["block_table"] = paged(torch, k, v, page_size=64)
    kc, vc, ks, vs, kd, vd = quantized(torch, k_in, v_in, scheme, group_size)
    o = lab.forward(q, kc, vc, chapter="07", kv_scheme=scheme, kv_group_size=group_size, k_scale=ks, v_scale=vs,
                    out=poisoned_like(torch, q), **kw)
    errors = []
    check_against_both(torch, f"{scheme}{group_size or ''} lens {lens} paged={paged_kv}", o, None, q, kd, vd,
                       k_in, v_in, errors, **kw)
    assert (o[3] == 0).all(), "a sequence with no key must output 0"
    report(scheme, errors)


@pytest.mark.parametrize("scheme,group_size", [SCHEMES[2], SCHEMES[3], SCHEMES[5]], ids=[SCHEME_IDS[i] for i in (2, 3, 5)])
def test_num_splits(cuda, scheme, group_size):
    """The same attention for any split count (the lse combine of 04 included)."""
    torch = cuda
    q, k, v = decode_problem(torch, 2, 32, 8, 5000, 128, SEED + 11)
    kc, vc, ks, vs, kd, vd = quantized(torch, k, v, scheme, group_size)
    errors = []
    for num_splits in (0, 1, 3, 7, 64):
        o, o_lse = lab.forward(q, kc, vc, chapter="07", kv_scheme=scheme, kv_group_size=group_size, k_scale=ks,
                               v_scale=vs, num_splits=num_splits, lse=True, out=poisoned_like(torch, q))
        check_against_both(torch, f"{scheme}{group_size or ''} num_splits {num_splits}", o, o_lse, q, kd, vd, k, v,
                           errors)
    report(scheme, errors)


def test_refusals_name_the_field(cuda):
    torch = cuda
    q, k, v = decode_problem(torch, 2, 8, 8, 64, 128, SEED)
    kc, vc, ks, vs = lab.quantize_kv(k, v, "int8_head")
    # Another chapter: the library's refusal, naming kv_quant (and where quantized caches are).
    with pytest.raises(lab.InvalidArgument, match=r"kv_quant") as refused:
        lab.forward(q, kc, vc, chapter="03", kv_scheme="int8_head", k_scale=ks, v_scale=vs)
    assert "03_flash_v2" in str(refused.value) and "07_kv_quant" in str(refused.value)
    with pytest.raises(lab.InvalidArgument, match=r"06_gqa_alibi: kv_quant.scheme = int8_head is not supported"):
        lab.forward(q, kc, vc, chapter="06", kv_scheme="int8_head", k_scale=ks, v_scale=vs)
    with pytest.raises(lab.InvalidArgument, match=r"07_kv_quant: kv_quant.k_scale is a null pointer"):
        lab.forward(q, kc, vc, chapter="07", kv_scheme="int8_head", v_scale=vs)
    # Scales of the size group 16 would need (the module checks sizes first): the library refuses the group.
    ks16 = torch.ones((2, 8, 64, 128 // 16), dtype=torch.float16, device=q.device)
    with pytest.raises(lab.InvalidArgument, match=r"kv_quant.group_size = 16 is not supported"):
        lab.forward(q, kc, vc, chapter="07", kv_scheme="int8_group", kv_group_size=16, k_scale=ks16, v_scale=ks16)
    with pytest.raises(lab.InvalidArgument, match=r"kv_quant.k_scale/v_scale are given but fp8_e4m3"):
        lab.forward(q, kc, vc, chapter="07", kv_scheme="fp8_e4m3", k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match=r"k_scale: expected a contiguous float16 tensor of 1024 elements"):
        lab.forward(q, kc, vc, chapter="07", kv_scheme="int8_head", k_scale=ks[:1], v_scale=vs)
    # fp32 scales (the format of ABI 3) are refused by name, not read as pairs of fp16 numbers.
    with pytest.raises(TypeError, match=r"v_scale: dtype torch.float32 does not match torch.float16"):
        lab.forward(q, kc, vc, chapter="07", kv_scheme="int8_head", k_scale=ks, v_scale=vs.float())
    with pytest.raises(TypeError, match=r"k: dtype torch.float16 is not a 1-byte code"):
        lab.forward(q, k, v, chapter="07", kv_scheme="int8_head", k_scale=ks, v_scale=vs)
    with pytest.raises(ValueError, match=r"k_scale/v_scale are given without a kv_scheme"):
        lab.forward(q, k, v, chapter="07", k_scale=ks, v_scale=vs)
    with pytest.raises(lab.InvalidArgument, match=r"07_kv_quant: seqlen_q = 2"):
        lab.forward(torch.cat([q, q], dim=1), kc, vc, chapter="07", kv_scheme="int8_head", k_scale=ks, v_scale=vs)
    with pytest.raises(lab.InvalidArgument, match=r"07_kv_quant: kv_group_size = 32 is only used by int8_group"):
        lab.quantize_kv(k, v, "int8_head", group_size=32)
    with pytest.raises(TypeError, match=r"k: dtype torch.bfloat16 does not match torch.float16"):
        lab.quantize_kv(k.to(torch.bfloat16), v, "int8_head")
    # After refusals the library still works.
    o = lab.forward(q, kc, vc, chapter="07", kv_scheme="int8_head", k_scale=ks, v_scale=vs)
    errors = []
    check_against_both(torch, "int8_head after refusals", o, None, q, dequantize(torch, kc, ks, "int8_head", 0),
                       dequantize(torch, vc, vs, "int8_head", 0), k, v, errors)


@needs_library
def test_read_ceiling_refuses_bad_arguments_and_measures_on_a_gpu():
    """lab_read_ceiling_gbps: a buffer under 1 MiB is refused by name before any GPU work; on a GPU
    the read ceiling is a positive bandwidth, and without one the CUDA error is raised, not a number."""
    with pytest.raises(lab.InvalidArgument, match="bytes = 4096 is below 1 MiB"):
        lab.read_ceiling_gbps(4096)
    if not gpu_present():
        with pytest.raises(lab.CudaError):
            lab.read_ceiling_gbps(1 << 24)
        return
    assert lab.read_ceiling_gbps(1 << 28) > 100
