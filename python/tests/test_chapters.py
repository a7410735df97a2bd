"""Every variant of every chapter in liblab_attention.so against PyTorch's attention in fp32.

    LAB_ATTENTION_LIB=build/lib/liblab_attention.so python3 -m pytest -q python/tests

Which features each variant is tested on comes from the library itself (lab.variants()'s support):
what a variant claims is compared with scaled_dot_product_attention on the fp16/bf16-rounded
inputs, computed in fp32 with an explicit mask (causal aligned bottom-right as in FlashAttention,
GQA by repeat_interleave, ALiBi as a bias); what it does not claim must be refused with a message
naming the field. Tolerances are the lab's (common/validate.cpp): with eps = 2^-10 (fp16) or 2^-7
(bf16), max |out - ref| <= 8 eps max(1, max |ref|), ||out - ref|| / ||ref|| <= 2 eps, lse within
1e-3; NaN/Inf fail; rows that see no key must be exactly 0 with lse = -inf.

Tests that need only the library (listing, the C error path) run anywhere it is built; the rest
are skipped without PyTorch, without a GPU, or without the library. LAB_TEST_SEED repeats a run.
"""
import ctypes
import itertools
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import lab  # noqa: E402  (python/lab, found through the line above)

SEED = int(os.environ.get("LAB_TEST_SEED", random.randrange(100000)))


def _library_variants():
    try:
        return lab.variants()
    except lab.LibraryNotFound:
        return []


VARIANTS = _library_variants()
needs_library = pytest.mark.skipif(not VARIANTS, reason="liblab_attention.so is not built")


def variant_params(feature=None, refused=False):
    """pytest params of the variants that support `feature` (or, refused=True, that do not)."""
    chosen = [e for e in VARIANTS if feature is None or e["support"][feature] != refused]
    if not chosen:  # say why nothing runs, e.g. before any chapter supports varlen
        why = "liblab_attention.so is not built" if not VARIANTS else \
            f"every variant {'supports' if refused else 'refuses'} {feature}"
        return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=why))]
    return [pytest.param(e, id=e["chapter"] + ("/" + e["variant"] if e["variant"] else "")) for e in chosen]


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    return torch


@pytest.fixture
def cuda(torch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not VARIANTS:
        pytest.skip("liblab_attention.so is not built")
    return torch


# ---- the library alone (no PyTorch, no GPU): runs in CI ----

def test_bad_names_and_a_missing_pytorch_raise_the_lab_errors(monkeypatch):
    with pytest.raises(lab.InvalidArgument, match=r"chapter = None, variant = None: expected names"):
        lab.support(None)
    with pytest.raises(lab.InvalidArgument, match=r"variant = 3: expected names"):
        lab.support("03", 3)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as without it
    with pytest.raises(lab.InvalidArgument, match=r"PyTorch is not installed .*pip install torch"):
        lab.forward(None, None, None)


def test_a_bad_library_path_raises_invalid_argument(tmp_path):
    not_a_library = tmp_path / "liblab_attention.so"
    not_a_library.write_text("not a shared library")
    for path, expected in ((tmp_path / "missing.so", r"LAB_ATTENTION_LIB: liblab_attention.so not found"),
                           (not_a_library, r"LAB_ATTENTION_LIB = .* does not load")):
        code = ("import lab\ntry:\n    lab.variants()\nexcept lab.InvalidArgument as e:\n    print(e)\n"
                "else:\n    print('loaded')")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, LAB_ATTENTION_LIB=str(path),
                                    PYTHONPATH=str(pathlib.Path(lab.__file__).parents[1])))
        assert r.returncode == 0 and re.search(expected, r.stdout), (r.stdout, r.stderr)


def test_library_is_built():
    """Fails (instead of every library test reporting as skipped) when the library is missing."""
    try:
        lab.variants()
    except lab.LibraryNotFound as e:
        pytest.fail(f"{e}\n(every test that needs the library reports as skipped)")


@needs_library
def test_lists_the_chapters_and_one_default_each():
    chapters = lab.chapters()
    assert list(chapters)[:3] == ["01_naive", "02_flash_v1", "03_flash_v2"]
    assert chapters["01_naive"] == ["naive", "cublas"]
    assert chapters["02_flash_v1"] == [""]
    assert chapters["03_flash_v2"] == ["loop_order", "mma", "fa2", "overlap"]
    defaults = {e["chapter"]: e["variant"] for e in VARIANTS if e["default"]}
    assert set(defaults) == set(chapters), "every chapter needs exactly one default variant"
    assert sum(e["default"] for e in VARIANTS) == len(chapters)
    assert defaults["01_naive"] == "naive" and defaults["03_flash_v2"] == "fa2"
    assert lab.support("03")["head_dims"] == [32, 64, 96, 128, 256]
    assert lab.support("01", "cublas")["lse"] is False and lab.support("01")["lse"] is True
    if "08_flash_v3" in chapters:  # built only when the CUDA architectures include 90
        assert chapters["08_flash_v3"] == ["wgmma", "tma", "ws", "pingpong"]
        assert defaults["08_flash_v3"] == "pingpong"
        assert lab.support("08")["head_dims"] == [64, 128]


def c_struct_fields(name):
    """(field, C type) pairs of a struct in capi/lab_attention.h, in order."""
    header = (pathlib.Path(__file__).resolve().parents[2] / "capi" / "lab_attention.h").read_text()
    body = re.search(r"typedef struct %s \{(.*?)\} %s;" % (name, name), header, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    fields = []
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        c_type, names = re.match(r"((?:const )?\w+\*?)\s+(.*)", decl, re.S).groups()
        for n in names.split(","):
            n = n.strip()
            array = re.match(r"(\w+)\[(\d+)\]", n)
            fields.append((array.group(1), f"{c_type}[{array.group(2)}]") if array else (n, c_type))
    return fields


@pytest.mark.parametrize("struct", ["LabAttnParams", "LabSupport"])
def test_python_structs_mirror_the_c_header(struct):
    c_types = {"uint32_t": ctypes.c_uint32, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
               "uint64_t": ctypes.c_uint64, "float": ctypes.c_float}
    py = getattr(lab, struct)._fields_
    c = c_struct_fields(struct)
    assert [n for n, _ in py] == [n for n, _ in c]
    for (name, py_type), (_, c_type) in zip(py, c):
        array = re.match(r"(\w+)\[(\d+)\]$", c_type)
        if array:  # int32_t[16]: the element type and the length
            element, length = c_types[array.group(1)], int(array.group(2))
            assert getattr(py_type, "_type_", None) is element and getattr(py_type, "_length_", None) == length, \
                f"{struct}.{name}: {py_type} for C {c_type}"
            continue
        want = ctypes.c_void_p if c_type.endswith("*") else c_types[c_type]
        assert py_type is want, f"{struct}.{name}: {py_type} for C {c_type}"


def fit_seqlen_q(support, sq):
    """sq, or the longest a decode-only variant takes."""
    return min(sq, support["max_seqlen_q"]) if support["max_seqlen_q"] else sq


def valid_c_params(head_dim=64, seqlen_q=33):
    """A problem the variant accepts, with fake (aligned, never dereferenced) device pointers."""
    p = lab.LabAttnParams.new()
    p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_kv, p.head_dim = 2, 4, 4, seqlen_q, 65, head_dim
    p.softmax_scale = head_dim ** -0.5
    p.q, p.k, p.v, p.o = 0x10000, 0x20000, 0x30000, 0x40000
    for t, heads, rows in (("q", 4, seqlen_q), ("k", 4, 65), ("v", 4, 65), ("o", 4, seqlen_q)):
        setattr(p, t + "_head_stride", head_dim)
        setattr(p, t + "_row_stride", heads * head_dim)
        setattr(p, t + "_batch_stride", rows * heads * head_dim)
    return p


def c_call(function, chapter, variant, p):
    lib = lab.load_library()
    bytes_needed = ctypes.c_size_t(12345)
    params = ctypes.byref(p) if p is not None else None
    if function == "forward":
        rc = lib.lab_forward(lab._name(chapter), lab._name(variant), params, None)
    else:
        rc = lib.lab_workspace_bytes(lab._name(chapter), lab._name(variant), params, ctypes.byref(bytes_needed))
    return rc, lib.lab_last_error().decode(), bytes_needed.value


BAD_C_PARAMS = {  # field: (the value that breaks a valid problem, what the message must say)
    "batch": (0, "batch = 0 must be > 0"),
    "seqlen_kv": (-3, "seqlen_kv = -3 must be > 0"),
    "heads_kv": (3, "is not a multiple of heads_kv = 3"),
    "softmax_scale": (float("nan"), "softmax_scale = nan must be finite"),
    "dtype": (7, "dtype = 7 is unknown"),
    "causal": (2, "causal = 2 must be 0 or 1"),
    "struct_size": (8, "struct_size = 8 does not match"),
    "abi_version": (99, "abi_version = 99 does not match"),
    "q": (None, "q is a null pointer"),
    "num_splits": (-1, "num_splits = -1 must be >= 0"),
    "total_q": (5, "total_q/total_kv are given without cu_seqlens_q/cu_seqlens_kv"),
}


@needs_library
@pytest.mark.parametrize("function", ["forward", "workspace"])
@pytest.mark.parametrize("field", list(BAD_C_PARAMS))
@pytest.mark.parametrize("entry", variant_params())
def test_c_api_refuses_bad_params_by_name(entry, field, function):
    s = entry["support"]
    p = valid_c_params(head_dim=head_dims_of(s)[0], seqlen_q=fit_seqlen_q(s, 33))
    value, expected = BAD_C_PARAMS[field]
    setattr(p, field, value)
    rc, message, _ = c_call(function, entry["chapter"], entry["variant"], p)
    assert rc == 1, message
    assert expected in message, message


@needs_library
def test_c_api_refuses_unsupported_head_dim_and_unknown_names():
    rc, message, _ = c_call("forward", "03", "", valid_c_params(head_dim=80))
    assert rc == 1 and "head_dim = 80" in message and "03_flash_v2" in message, message
    rc, message, _ = c_call("forward", "09", None, valid_c_params())
    assert rc == 2 and "chapter" in message and "03_flash_v2" in message, message
    rc, message, _ = c_call("forward", "03_flash_v2", "fa3", valid_c_params())
    assert rc == 2 and "variant" in message and "fa2" in message, message
    rc, message, _ = c_call("workspace", "03", None, None)
    assert rc == 1 and "params" in message, message
    rc, message, _ = c_call("forward", None, None, valid_c_params())
    assert rc == 2 and "chapter" in message, message


@needs_library
def test_c_api_reports_the_workspace_of_the_chapter():
    p = valid_c_params()
    rc, message, bytes_needed = c_call("workspace", "01_naive", "naive", p)
    assert rc == 0, message
    assert bytes_needed == 2 * 4 * 33 * 65 * 4  # S in fp32: batch * heads_q * seqlen_q * seqlen_kv
    rc, message, bytes_needed = c_call("workspace", "03", None, p)
    assert (rc, bytes_needed) == (0, 0), message
    # Without it, a chapter that needs one refuses to run (and never touches the GPU).
    rc, message = c_call("forward", "01", None, p)[:2]
    assert rc == 1 and "workspace" in message, message


@needs_library
@pytest.mark.parametrize("function", ["forward", "workspace"])
@pytest.mark.parametrize("entry", variant_params("varlen"))
def test_c_api_varlen_needs_totals_and_packed_tensors(entry, function):
    """Refused before any table is read (the fake cu_seqlens pointers are never followed)."""
    s = entry["support"]
    d = head_dims_of(s)[0]
    p = valid_c_params(head_dim=d, seqlen_q=fit_seqlen_q(s, 33))
    p.cu_seqlens_q, p.cu_seqlens_kv = 0x50000, 0x50100
    for t in "qkvo":
        setattr(p, t + "_batch_stride", 0)
    rc, message, _ = c_call(function, entry["chapter"], entry["variant"], p)
    assert rc == 1 and "total_q = 0 must be > 0 with cu_seqlens_q" in message, message
    p.total_q, p.total_kv = 66, 0
    rc, message, _ = c_call(function, entry["chapter"], entry["variant"], p)
    assert rc == 1 and "total_kv = 0 must be > 0 with cu_seqlens_kv" in message, message
    p.total_kv = 130
    for t in "qkvo":  # dense strides (set_contiguous_strides before cu_seqlens) move sequence 1 past the rows
        setattr(p, t + "_batch_stride", 33 * 4 * d)
        rc, message, _ = c_call(function, entry["chapter"], entry["variant"], p)
        assert rc == 1 and f"{t}_batch_stride = {33 * 4 * d} must be 0 with cu_seqlens_q" in message, message
        setattr(p, t + "_batch_stride", 0)


def test_max_seqlen_with_dense_inputs_is_refused_by_name():
    """Refused before the tensors are looked at: needs neither PyTorch nor the library."""
    with pytest.raises(lab.InvalidArgument, match=r"max_seqlen_q = 8 is only used with cu_seqlens_q"):
        lab.forward(object(), object(), object(), max_seqlen_q=8)
    with pytest.raises(lab.InvalidArgument, match=r"max_seqlen_kv = 8 is only used with cu_seqlens_kv"):
        lab.forward(object(), object(), object(), max_seqlen_kv=8)


# ---- the Python checks (PyTorch, no GPU needed) ----

def test_python_checks_name_the_tensor(torch):
    q = torch.zeros(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"q: must be a CUDA tensor"):
        lab.forward(q, q, q)
    with pytest.raises(TypeError, match=r"q: dtype torch.float32 is not supported"):
        lab.forward(q.float(), q, q)


# ---- against PyTorch, on the GPU ----

def input_tensor(torch, shape, dtype, std=1.0, outliers=False):
    x = torch.randn(shape, device="cuda", dtype=torch.float32) * std
    if outliers:  # one channel in 16 with a 10x larger spread, as real KV caches have
        x[..., ::16] *= 10
    return x.to(dtype)


def reference(torch, q, k, v, *, causal, scale, seqlen_kv=None, alibi_slopes=None, cu_seqlens_q=None,
              cu_seqlens_kv=None, cache_seqlens=None, block_table=None):
    """fp32 attention of the (rounded) inputs, per sequence, through SDPA's math backend with an explicit
    mask. Returns out in q's layout and lse [batch, heads_q, max seqlen_q] (NaN past a sequence's end)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    varlen = cu_seqlens_q is not None
    cu_q = cu_seqlens_q.tolist() if varlen else None
    cu_kv = cu_seqlens_kv.tolist() if varlen else None
    lens_kv = cache_seqlens.tolist() if cache_seqlens is not None else None
    batch = len(cu_q) - 1 if varlen else q.shape[0]
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    max_sq = max(b - a for a, b in zip(cu_q, cu_q[1:])) if varlen else q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads_q, max_sq), float("nan"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        qb = q[cu_q[b]:cu_q[b + 1]] if varlen else q[b]  # [sq, heads_q, d]
        if block_table is not None:
            kb, vb = (t[block_table[b].long()].flatten(0, 1) for t in (k, v))
        elif varlen:
            kb, vb = k[cu_kv[b]:cu_kv[b + 1]], v[cu_kv[b]:cu_kv[b + 1]]
        else:
            kb, vb = k[b], v[b]
        sk = lens_kv[b] if lens_kv is not None else (kb.shape[0] if seqlen_kv is None or varlen else seqlen_kv)
        kb, vb = kb[:sk], vb[:sk]
        sq = qb.shape[0]
        # [heads, seqlen, d] in fp32, K/V heads repeated for GQA: query head h reads KV head h / group.
        qh = qb.float().transpose(0, 1)
        kh, vh = (t.float().transpose(0, 1).repeat_interleave(heads_q // heads_kv, dim=0) for t in (kb, vb))
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if causal:
            visible = visible.tril(sk - sq)  # bottom-right: query i sees keys j <= i + sk - sq
        bias = torch.zeros(heads_q, sq, sk, device=q.device)
        if alibi_slopes is not None:
            i = torch.arange(sq, device=q.device).view(sq, 1)
            j = torch.arange(sk, device=q.device).view(1, sk)
            bias = -alibi_slopes.float().view(heads_q, 1, 1) * (i + sk - sq - j).abs().float()  # FlashAttention's
        bias = bias.masked_fill(~visible, float("-inf"))
        has_key = visible.any(dim=1)  # [sq]
        if sk > 0:
            with sdpa_kernel(SDPBackend.MATH):
                ob = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=scale)
            ob = torch.where(has_key.view(1, sq, 1), ob, torch.zeros_like(ob))
            lse_b = torch.logsumexp(torch.matmul(qh, kh.transpose(-1, -2)) * scale + bias, dim=-1)
        else:
            ob = torch.zeros_like(qh)
            lse_b = torch.full((heads_q, sq), float("-inf"), device=q.device)
        if varlen:
            out[cu_q[b]:cu_q[b + 1]] = ob.transpose(0, 1)
        else:
            out[b] = ob.transpose(0, 1)
        lse[b, :, :sq] = lse_b
    return out, lse


def assert_matches(torch, got, ref, dtype, what, got_lse=None, ref_lse=None):
    """The lab's check: written and finite, max abs and relative L2 error by dtype, lse, empty rows 0."""
    eps = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    what = f"{what} (seed {SEED}: LAB_TEST_SEED={SEED} repeats it)"
    g = got.float()
    assert torch.isfinite(g).all(), f"{what}: NaN/Inf or unwritten elements in the output"
    err = (g - ref).abs()
    max_err, max_ref = err.max().item(), ref.abs().max().item()
    ref_norm = ref.norm().item()
    rel = err.norm().item() / ref_norm if ref_norm > 0 else err.norm().item()
    assert max_err <= 8 * eps * max(1.0, max_ref), f"{what}: max_abs {max_err:.3e} (max |ref| {max_ref:.2f})"
    assert rel <= 2 * eps, f"{what}: rel_l2 {rel:.3e}"
    if got_lse is not None:
        defined = ~torch.isnan(ref_lse)
        no_key = torch.isinf(ref_lse) & defined
        assert torch.equal(got_lse[no_key], ref_lse[no_key]), f"{what}: lse of rows with no key must be -inf"
        finite = defined & ~no_key
        lse_err = (got_lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
        assert lse_err <= 1e-3, f"{what}: lse error {lse_err:.3e}"


def poisoned_like(torch, q):
    return torch.full_like(q, float("nan"))  # unwritten elements stay NaN and fail the check


# Chapters whose kernels exist for one GPU generation only: elsewhere they must refuse by name.
NEEDS_COMPUTE_CAPABILITY = {"08_flash_v3": (9, 0)}  # sm_90a code (wgmma, TMA)


def skip_unless_it_runs_here(torch, entry):
    """On a GPU the chapter is not built for, check that it refuses by name, then skip."""
    need = NEEDS_COMPUTE_CAPABILITY.get(entry["chapter"])
    if need is None or torch.cuda.get_device_capability() == need:
        return
    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(lab.InvalidArgument, match=r"needs a GPU of compute capability %d\.%d" % need):
        lab.forward(q, q, q, chapter=entry["chapter"], variant=entry["variant"])
    pytest.skip(f"{entry['chapter']} runs on compute capability {need[0]}.{need[1]} only (its refusal was checked)")


def run_and_check(torch, entry, dtype, b, hq, hkv, sq, sk, d, causal, dist="normal", lse=None, layout="bshd"):
    skip_unless_it_runs_here(torch, entry)
    support = entry["support"]
    lse = support["lse"] if lse is None else lse
    std = 3.0 if dist == "large_logits" else 1.0  # scale * q.k with a spread near 9: peaked softmax rows
    if layout == "bshd":
        q = input_tensor(torch, (b, sq, hq, d), dtype, std)
        k = input_tensor(torch, (b, sk, hkv, d), dtype, std, dist == "outliers")
        v = input_tensor(torch, (b, sk, hkv, d), dtype, 1.0, dist == "outliers")
    elif layout == "strided":  # rows padded by 8 elements: row strides != heads * head_dim
        q, k, v = (input_tensor(torch, (b, s, h * d + 8), dtype)[..., :h * d].unflatten(-1, (h, d))
                   for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    else:  # "bhsd": SDPA's layout, handed over transposed (head stride > row stride)
        q, k, v = (input_tensor(torch, (b, h, s, d), dtype).transpose(1, 2)
                   for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    scale = d ** -0.5
    out = lab.forward(q, k, v, chapter=entry["chapter"], variant=entry["variant"], causal=causal, lse=lse,
                      out=poisoned_like(torch, q))
    o, o_lse = out if lse else (out, None)
    torch.cuda.synchronize()
    ref, ref_lse = reference(torch, q, k, v, causal=causal, scale=scale)
    what = f"{entry['chapter']}/{entry['variant']} b{b} h{hq}/{hkv} sq{sq} sk{sk} d{d} causal={causal} {dist} {layout}"
    assert_matches(torch, o, ref, dtype, what, o_lse, ref_lse if lse else None)
    if causal and sq > sk:  # rows i < sq - sk see no key: exactly 0
        assert (o[:, :sq - sk] == 0).all(), f"{what}: rows with no visible key are not 0"


# The lab's awkward shapes (common/test_main.cpp): seqlen 1, 17, 1000 and other non-multiples of the
# tiles, sq != sk both ways (with causal, rows that see no key), large logits, outliers, GQA 4 and 8,
# MQA, batch > #SMs.
AWKWARD = [  # b, hq, hkv, sq, sk, causal, dist
    (1, 1, 1, 1, 1, False, "normal"), (1, 2, 2, 1, 1000, True, "normal"),
    (2, 2, 2, 17, 17, True, "normal"), (1, 2, 2, 17, 1000, True, "normal"),
    (1, 2, 2, 1000, 17, True, "normal"), (2, 3, 3, 1000, 1000, False, "normal"),
    (1, 2, 2, 1000, 1000, True, "large_logits"), (1, 4, 4, 129, 257, False, "outliers"),
    (1, 2, 2, 257, 129, False, "large_logits"), (200, 1, 1, 33, 65, True, "normal"),
    (1, 8, 2, 300, 300, True, "normal"), (1, 8, 1, 100, 200, False, "large_logits"),
    (1, 16, 2, 64, 128, True, "normal"), (1, 2, 2, 1025, 1025, True, "normal"),
]


# Variants that round on purpose and are tested on normal inputs only, as their C++ tests do: the
# unfused cuBLAS baseline stores S in 16 bits, which is its lesson (large logits exceed the tolerance).
NORMAL_INPUTS_ONLY = {("01_naive", "cublas")}


def dtypes_of(support):
    return [n for n, ok in (("float16", support["fp16"]), ("bfloat16", support["bf16"])) if ok]


def head_dims_of(support, everything=False):
    """64 and 128 where allowed; with everything=True every listed head_dim, or a few odd ones in range."""
    listed, top, vec = support["head_dims"], support["max_head_dim"], support["vector_elems"]
    if everything:
        return listed or sorted({d for d in (8, 40, 72, top - top % vec) if d % vec == 0 and 0 < d <= top})
    allowed = [d for d in (64, 128) if (d in listed if listed else d <= top)]
    return allowed or (listed[:1] if listed else [top - top % vec])


def awkward_cases():
    for e in VARIANTS:
        s = e["support"]
        for dtype in dtypes_of(s):
            for d in head_dims_of(s):
                for shape in AWKWARD:
                    b, hq, hkv, sq, sk, causal, dist = shape
                    if (causal and not s["causal"]) or (hq != hkv and not s["gqa"]) or \
                            (s["max_seqlen_q"] and sq > s["max_seqlen_q"]):
                        continue  # refusals are tested below
                    if dist != "normal" and (e["chapter"], e["variant"]) in NORMAL_INPUTS_ONLY:
                        continue
                    name = e["chapter"] + ("/" + e["variant"] if e["variant"] else "")
                    yield pytest.param(e, dtype, d, shape, id=f"{name}-{dtype}-d{d}-b{b}h{hq}/{hkv}sq{sq}sk{sk}"
                                       f"{'c' if causal else ''}-{dist}")


@pytest.mark.parametrize("entry,dtype,d,shape", list(awkward_cases()))
def test_matches_sdpa_on_awkward_shapes(cuda, entry, dtype, d, shape):
    torch = cuda
    torch.manual_seed(SEED * 1000 + AWKWARD.index(shape))
    b, hq, hkv, sq, sk, causal, dist = shape
    run_and_check(torch, entry, getattr(torch, dtype), b, hq, hkv, sq, sk, d, causal, dist)


@pytest.mark.parametrize("layout", ["strided", "bhsd"])
@pytest.mark.parametrize("entry", variant_params())
def test_every_head_dim_and_layout(cuda, entry, layout):
    torch = cuda
    s = entry["support"]
    for d in head_dims_of(s, everything=True):
        for dtype in dtypes_of(s):
            for causal in [False, True] if s["causal"] else [False]:
                torch.manual_seed(SEED + d + 7 * causal)
                hkv = 2 if s["gqa"] else 4
                run_and_check(torch, entry, getattr(torch, dtype), 2, 4, hkv, fit_seqlen_q(s, 200), 333, d, causal,
                              layout=layout)


@pytest.mark.parametrize("entry", variant_params())
def test_decode_shapes(cuda, entry):
    """One query token against long KV caches (the decode grid, smaller), MHA and GQA 32/8."""
    torch = cuda
    s = entry["support"]
    d = 128 if 128 in head_dims_of(s) else head_dims_of(s)[0]
    for b, hkv, sk in ((1, 32, 4097), (3, 8, 1000), (4, 32, 1)):
        if hkv != 32 and not s["gqa"]:
            continue
        torch.manual_seed(SEED + b + sk)
        run_and_check(torch, entry, torch.float16, b, 32, hkv, 1, sk, d, False)


# ---- features the chapters add (ALiBi, varlen, KV cache, paged KV, split-KV) ----

def base_dtype_d(torch, support):
    dtype = torch.float16 if support["fp16"] else torch.bfloat16
    return dtype, head_dims_of(support)[0]


def alibi_slopes_standard(heads):
    """common/reference.cpp's slopes (Press et al.; BLOOM/MPT interleaving for non-powers of two)."""
    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    closest = 1 << (heads.bit_length() - 1)
    slopes = pow2(closest)
    slopes += pow2(2 * closest)[0::2][:heads - closest]
    return slopes


@pytest.mark.parametrize("entry", variant_params("alibi"))
def test_alibi(cuda, entry):
    torch = cuda
    s = entry["support"]
    dtype, d = base_dtype_d(torch, s)
    for hq, sq, sk, causal in ((8, 300, 300, True), (6, 17, 1000, False), (8, 1, 4000, False)):
        if causal and not s["causal"]:
            continue
        sq = fit_seqlen_q(s, sq)
        torch.manual_seed(SEED + sq)
        q, k, v = (input_tensor(torch, (2, n, hq, d), dtype) for n in (sq, sk, sk))
        slopes = torch.tensor(alibi_slopes_standard(hq), device="cuda", dtype=torch.float32)
        o = lab.forward(q, k, v, chapter=entry["chapter"], variant=entry["variant"], causal=causal,
                        alibi_slopes=slopes, out=poisoned_like(torch, q))
        ref, _ = reference(torch, q, k, v, causal=causal, scale=d ** -0.5, alibi_slopes=slopes)
        assert_matches(torch, o, ref, dtype, f"alibi h{hq} sq{sq} sk{sk} causal={causal}")


@pytest.mark.parametrize("entry", variant_params("varlen"))
def test_varlen(cuda, entry):
    torch = cuda
    s = entry["support"]
    dtype, d = base_dtype_d(torch, s)
    hq, hkv = (8, 2) if s["gqa"] else (4, 4)
    lens_q, lens_kv = [1, 17, 300, 129, 1000], [17, 1, 300, 1000, 1000]
    lens_q = [fit_seqlen_q(s, n) for n in lens_q]
    cu = lambda lens: torch.tensor([0] + list(itertools.accumulate(lens)), device="cuda", dtype=torch.int32)
    for causal in [False, True] if s["causal"] else [False]:
        torch.manual_seed(SEED + causal)
        q = input_tensor(torch, (sum(lens_q), hq, d), dtype)
        k, v = (input_tensor(torch, (sum(lens_kv), hkv, d), dtype) for _ in range(2))
        cu_q, cu_kv = cu(lens_q), cu(lens_kv)
        out = lab.forward(q, k, v, chapter=entry["chapter"], variant=entry["variant"], causal=causal,
                          cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, lse=s["lse"], out=poisoned_like(torch, q))
        o, o_lse = out if s["lse"] else (out, None)
        ref, ref_lse = reference(torch, q, k, v, causal=causal, scale=d ** -0.5, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv)
        assert_matches(torch, o, ref, dtype, f"varlen causal={causal}", o_lse, ref_lse if s["lse"] else None)
        if s["lse"]:  # rows past a sequence's end are padding: NaN, as documented
            assert torch.isnan(o_lse[torch.isnan(ref_lse)]).all()


@pytest.mark.parametrize("entry", variant_params("varlen"))
def test_varlen_offsets_past_the_packed_tensors_are_refused(cuda, entry):
    """The issue's call: cu_seqlens [0, 5, 20] on 10-row tensors read and wrote rows 10..19."""
    torch = cuda
    s = entry["support"]
    dtype, d = base_dtype_d(torch, s)
    q, k, v = (input_tensor(torch, (10, 2, d), dtype) for _ in range(3))
    cu = lambda xs: torch.tensor(xs, device="cuda", dtype=torch.int32)
    call = lambda cu_q, cu_kv: lab.forward(q, k, v, chapter=entry["chapter"], variant=entry["variant"],
                                           cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv)
    with pytest.raises(lab.InvalidArgument, match=r"cu_seqlens_q\[-1\] = 20 exceeds q.shape\[0\] = 10"):
        call(cu([0, 5, 20]), cu([0, 5, 10]))
    with pytest.raises(lab.InvalidArgument, match=r"cu_seqlens_kv\[-1\] = 20 exceeds k.shape\[0\] = 10"):
        call(cu([0, 5, 10]), cu([0, 5, 20]))
    # A C caller's totals are checked by the library itself, on the tables as the stream has them.
    prepared = lab.prepare(q, k, v, chapter=entry["chapter"], variant=entry["variant"],
                           cu_seqlens_q=cu([0, 5, 10]), cu_seqlens_kv=cu([0, 5, 10]))
    prepared._params.total_q = 8
    with pytest.raises(lab.InvalidArgument, match=r"cu_seqlens_q\[2\] = 10 exceeds total_q = 8"):
        prepared.run()


def paged(torch, k, v, page_size, spare_pages=3):
    """k, v [b, capacity, h, d] scattered over shuffled pages: (k_pages, v_pages, block_table)."""
    b, cap, h, d = k.shape
    per_seq = -(-cap // page_size)
    num_pages = b * per_seq + spare_pages
    order = torch.randperm(num_pages, device="cuda")[:b * per_seq].to(torch.int32)
    block_table = order.view(b, per_seq).contiguous()
    pad = per_seq * page_size - cap
    pages = []
    for t in (k, v):
        # Unused pages hold large values: reading one by mistake shows.
        store = torch.full((num_pages, page_size, h, d), 100.0, device="cuda", dtype=t.dtype)
        padded = torch.cat([t, torch.zeros(b, pad, h, d, device="cuda", dtype=t.dtype)], dim=1)
        store[block_table.long()] = padded.view(b, per_seq, page_size, h, d)
        pages.append(store)
    return pages[0], pages[1], block_table


@pytest.mark.parametrize("paged_kv", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("entry", variant_params("cache_seqlens"))
def test_kv_cache_lengths(cuda, entry, paged_kv):
    """Decode and short prefill against a KV cache with per-sequence lengths (0 included), dense or paged."""
    torch = cuda
    s = entry["support"]
    if paged_kv and not s["paged_kv"]:
        pytest.skip("paged KV is not supported by this variant (its refusal is tested below)")
    dtype, d = base_dtype_d(torch, s)
    hq, hkv = (32, 8) if s["gqa"] else (8, 8)
    lens = [1, 4096, 777, 0]
    for sq, causal in ((1, False), (5, True)):
        if (causal and not s["causal"]) or (s["max_seqlen_q"] and sq > s["max_seqlen_q"]):
            continue
        torch.manual_seed(SEED + sq)
        q = input_tensor(torch, (len(lens), sq, hq, d), dtype)
        k, v = (input_tensor(torch, (len(lens), 4096, hkv, d), dtype) for _ in range(2))
        cache_seqlens = torch.tensor(lens, device="cuda", dtype=torch.int32)
        kw = dict(cache_seqlens=cache_seqlens)
        k_in, v_in = k, v
        if paged_kv:
            k_in, v_in, kw["block_table"] = paged(torch, k, v, page_size=64)
        o = lab.forward(q, k_in, v_in, chapter=entry["chapter"], variant=entry["variant"], causal=causal,
                        out=poisoned_like(torch, q), **kw)
        ref, _ = reference(torch, q, k, v, causal=causal, scale=d ** -0.5, cache_seqlens=cache_seqlens)
        assert_matches(torch, o, ref, dtype, f"cache_seqlens {lens} sq{sq} paged={paged_kv}")


@pytest.mark.parametrize("entry", variant_params("paged_kv"))
def test_paged_kv(cuda, entry):
    torch = cuda
    s = entry["support"]
    dtype, d = base_dtype_d(torch, s)
    for page_size, sk, sq in ((16, 1000, 1), (256, 4097, 1), (64, 300, 17)):
        if s["max_seqlen_q"] and sq > s["max_seqlen_q"]:
            continue
        torch.manual_seed(SEED + page_size)
        q = input_tensor(torch, (3, sq, 8, d), dtype)
        k, v = (input_tensor(torch, (3, sk, 8, d), dtype) for _ in range(2))
        k_pages, v_pages, block_table = paged(torch, k, v, page_size)
        o = lab.forward(q, k_pages, v_pages, chapter=entry["chapter"], variant=entry["variant"],
                        block_table=block_table, max_seqlen_kv=sk, out=poisoned_like(torch, q))
        ref, _ = reference(torch, q, k, v, causal=False, scale=d ** -0.5)
        assert_matches(torch, o, ref, dtype, f"paged page_size {page_size} sk{sk} sq{sq}")


@pytest.mark.parametrize("entry", variant_params("splits"))
def test_num_splits(cuda, entry):
    """Split-KV decoding gives the same attention for any split count (lse combine included)."""
    torch = cuda
    s = entry["support"]
    dtype, d = base_dtype_d(torch, s)
    for num_splits in (0, 1, 3, 7, 64):
        torch.manual_seed(SEED + num_splits)
        q = input_tensor(torch, (2, 1, 32, d), dtype)
        k, v = (input_tensor(torch, (2, 5000, 32, d), dtype) for _ in range(2))
        out = lab.forward(q, k, v, chapter=entry["chapter"], variant=entry["variant"], num_splits=num_splits,
                          lse=s["lse"], out=poisoned_like(torch, q))
        o, o_lse = out if s["lse"] else (out, None)
        ref, ref_lse = reference(torch, q, k, v, causal=False, scale=d ** -0.5)
        assert_matches(torch, o, ref, dtype, f"num_splits {num_splits}", o_lse, ref_lse if s["lse"] else None)


# ---- refusals: what a variant does not support raises an exception naming the field ----

def refusal_call(torch, feature, entry):
    """A call that uses `feature` and nothing else the variant lacks."""
    s = entry["support"]
    dtype, d = base_dtype_d(torch, s)
    b, h, sq, sk = 2, 4, 1, 64
    q = input_tensor(torch, (b, sq, h, d), dtype)
    k, v = (input_tensor(torch, (b, sk, h, d), dtype) for _ in range(2))
    kw = {}
    if feature == "bf16":
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    elif feature == "fp16":
        q, k, v = (t.to(torch.float16) for t in (q, k, v))
    elif feature == "causal":
        kw["causal"] = True
    elif feature == "gqa":
        k, v = k[:, :, :2].contiguous(), v[:, :, :2].contiguous()
    elif feature == "lse":
        kw["lse"] = True
    elif feature == "alibi":
        kw["alibi_slopes"] = torch.ones(h, device="cuda", dtype=torch.float32)
    elif feature == "varlen":
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        kw["cu_seqlens_q"] = torch.tensor([0, sq, 2 * sq], device="cuda", dtype=torch.int32)
        kw["cu_seqlens_kv"] = torch.tensor([0, sk, 2 * sk], device="cuda", dtype=torch.int32)
    elif feature == "cache_seqlens":
        kw["cache_seqlens"] = torch.full((b,), sk, device="cuda", dtype=torch.int32)
    elif feature == "paged_kv":
        k, v, kw["block_table"] = paged(torch, k, v, page_size=16)
    elif feature == "splits":
        kw["num_splits"] = 2
    return lambda: lab.forward(q, k, v, chapter=entry["chapter"], variant=entry["variant"], **kw)


REFUSAL_NAMES = {"bf16": "dtype", "fp16": "dtype", "causal": "causal", "gqa": "heads_kv", "lse": "lse",
                 "alibi": "alibi_slopes", "varlen": "cu_seqlens", "cache_seqlens": "cache_seqlens",
                 "paged_kv": "block_table", "splits": "num_splits"}


def refusal_cases():
    for feature, field in REFUSAL_NAMES.items():
        for p in variant_params(feature, refused=True):
            yield pytest.param(p.values[0], feature, field, id=f"{p.id}-{feature}", marks=p.marks)


@pytest.mark.parametrize("entry,feature,field", list(refusal_cases()))
def test_unsupported_features_are_refused_by_name(cuda, entry, feature, field):
    torch = cuda
    with pytest.raises(lab.InvalidArgument, match=field) as refused:
        refusal_call(torch, feature, entry)()
    assert refused.value.code == 1
    assert entry["chapter"] in str(refused.value)  # the library's message, not one made up here


def test_bad_input_raises_with_the_field_name(cuda):
    torch = cuda
    q = input_tensor(torch, (1, 64, 4, 80), torch.float16)
    with pytest.raises(lab.InvalidArgument, match=r"03_flash_v2: head_dim = 80 is not supported"):
        lab.forward(q, q, q, chapter="03")
    q = input_tensor(torch, (1, 64, 6, 64), torch.float16)
    k = input_tensor(torch, (1, 64, 4, 64), torch.float16)
    with pytest.raises(lab.InvalidArgument, match=r"heads_q = 6 is not a multiple of heads_kv = 4"):
        lab.forward(q, k, k, chapter="03")
    with pytest.raises(ValueError, match=r"k: must be a CUDA tensor"):
        lab.forward(q, k.cpu(), k, chapter="03")
    with pytest.raises(TypeError, match=r"k: dtype torch.bfloat16 does not match torch.float16"):
        lab.forward(q, k.to(torch.bfloat16), k, chapter="03")
    wide = input_tensor(torch, (1, 64, 6, 128), torch.float16)
    with pytest.raises(ValueError, match=r"q: head_dim stride is 2, must be 1"):
        lab.forward(wide[..., ::2], k, k, chapter="03")
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions"):
        lab.forward(q[0], k, k, chapter="03")
    with pytest.raises(lab.UnknownName, match=r"chapter = \"42\" is unknown"):
        lab.forward(q, q, q, chapter="42")
    with pytest.raises(lab.UnknownName, match=r"variant = \"fa3\" is unknown in 03_flash_v2"):
        lab.forward(q, q, q, chapter="03", variant="fa3")
    # After refusals the library still works.
    o = lab.forward(q, q, q, chapter="03")
    ref, _ = reference(torch, q, q, q, causal=False, scale=64 ** -0.5)
    assert_matches(torch, o, ref, torch.float16, "03 after refusals")


def test_runs_on_the_current_stream(cuda):
    """Work is enqueued on PyTorch's current stream: a result read on that stream is complete."""
    torch = cuda
    side = torch.cuda.Stream()
    q = input_tensor(torch, (4, 2048, 16, 128), torch.float16)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        o = lab.forward(q, q, q, chapter="03", causal=True)
        snapshot = o.clone()  # ordered after the kernel only if the kernel ran on `side`
    side.synchronize()
    ref, _ = reference(torch, q[:1], q[:1], q[:1], causal=True, scale=128 ** -0.5)
    assert_matches(torch, snapshot[:1], ref, torch.float16, "03 on a side stream")


# ---- the reference itself, against a plain loop (PyTorch on the CPU; no GPU needed) ----

def test_reference_against_a_loop(torch):
    """varlen, paged KV with cache lengths, ALiBi, GQA and causal bottom-right, row by row."""
    from torch.nn.attention import SDPBackend  # noqa: F401  (the reference needs it)
    g = torch.Generator().manual_seed(SEED)
    hq, hkv, d, scale = 4, 2, 8, 0.3
    lens_q, lens_kv = [3, 1, 5], [2, 4, 7]
    q = torch.randn(sum(lens_q), hq, d, generator=g)
    k, v = (torch.randn(sum(lens_kv), hkv, d, generator=g) for _ in range(2))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    cu = lambda lens: torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32)
    out, lse = reference(torch, q, k, v, causal=True, scale=scale, alibi_slopes=slopes,
                         cu_seqlens_q=cu(lens_q), cu_seqlens_kv=cu(lens_kv))
    for b in range(3):
        sq, sk = lens_q[b], lens_kv[b]
        for i in range(sq):
            for h in range(hq):
                row = sum(lens_q[:b]) + i
                keys = [j for j in range(sk) if j <= i + sk - sq]
                if not keys:
                    assert (out[row, h] == 0).all() and lse[b, h, i] == float("-inf")
                    continue
                s = torch.tensor([scale * float(q[row, h] @ k[sum(lens_kv[:b]) + j, h // 2]) +
                                  -float(slopes[h]) * abs(i + sk - sq - j) for j in keys])
                p = torch.softmax(s, 0)
                want = sum(p[n] * v[sum(lens_kv[:b]) + j, h // 2] for n, j in enumerate(keys))
                assert torch.allclose(out[row, h], want, atol=1e-5), (b, i, h)
                assert abs(float(lse[b, h, i]) - float(torch.logsumexp(s, 0))) < 1e-5
        assert torch.isnan(lse[b, :, sq:]).all()

    # Paged KV with per-sequence lengths: the same as the dense cache it was cut from.
    kd, vd = (torch.randn(2, 40, hkv, d, generator=g) for _ in range(2))
    qd = torch.randn(2, 2, hq, d, generator=g)
    lens = torch.tensor([40, 9], dtype=torch.int32)
    dense, _ = reference(torch, qd, kd, vd, causal=True, scale=scale, cache_seqlens=lens)
    for b in range(2):
        sk = int(lens[b])
        want, _ = reference(torch, qd[b:b + 1], kd[b:b + 1, :sk], vd[b:b + 1, :sk], causal=True, scale=scale)
        assert torch.allclose(dense[b:b + 1], want, atol=1e-6)
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
    kp, vp = (torch.full((6, 16, hkv, d), 1e3) for _ in range(2))
    for b in range(2):
        for n in range(3):
            rows = slice(16 * n, min(16 * n + 16, 40))
            kp[table[b, n], :rows.stop - rows.start] = kd[b, rows]
            vp[table[b, n], :rows.stop - rows.start] = vd[b, rows]
    paged_out, _ = reference(torch, qd, kp, vp, causal=True, scale=scale, cache_seqlens=lens, block_table=table)
    assert torch.allclose(paged_out, dense, atol=1e-6)
