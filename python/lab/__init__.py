"""Every chapter of the lab, called on PyTorch CUDA tensors through the C interface (ctypes only).

    import torch, lab
    q, k, v = (torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    o = lab.forward(q, k, v, chapter="03", causal=True)              # 03_flash_v2, its default "fa2"
    o, lse = lab.forward(q, k, v, chapter="01", variant="naive", lse=True)
    print(lab.chapters())        # {'01_naive': ['naive', 'cublas'], '02_flash_v1': [''], ...}
    call = lab.prepare(q, k, v, chapter="03"); call.run(); call.run()   # checked once, run again

    # 07_kv_quant: decode (seqlen_q = 1) from an int8 or FP8 KV cache made from fp16 K, V
    kc, vc, ks, vs = lab.quantize_kv(k, v, "int8_head")               # codes and fp16 scales
    o = lab.forward(q[:, -1:], kc, vc, chapter="07", kv_scheme="int8_head", k_scale=ks, v_scale=vs)

    # 08_flash_v3 (Hopper: wgmma, TMA): in the library when built for sm_90; compute capability 9.0 only
    o = lab.forward(q, k, v, chapter="08", causal=True)              # its default step "pingpong"

Tensors use FlashAttention's layout: q, out [batch, seqlen_q, heads_q, head_dim], k, v
[batch, seqlen_kv, heads_kv, head_dim] (varlen: [total, heads, head_dim]; paged KV: k, v
[num_pages, page_size, heads_kv, head_dim]), any strides but a contiguous head_dim. The call is
enqueued on PyTorch's current stream of the tensors' device. What a chapter does not support is
refused by the library, and its message (naming the field) becomes the exception's message.

The library is liblab_attention.so from the lab's build: $LAB_ATTENTION_LIB (the file, or the
folder holding it), else build/lib/ or build-gpu/lib/ under the repository root. Importing this
module needs neither the library nor PyTorch; the functions that do load them when first called.
"""
import ctypes
import math
import os
import pathlib
import threading

__all__ = ["forward", "prepare", "Call", "quantize_kv", "chapters", "variants", "support", "library_path",
           "load_library", "KV_SCHEMES", "LabError", "InvalidArgument", "UnknownName", "CudaError",
           "LibraryNotFound"]

ABI_VERSION = 5  # LAB_ATTENTION_ABI_VERSION in capi/lab_attention.h (5: varlen totals total_q, total_kv)
LIB_NAME = "liblab_attention.so"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

LAB_OK, LAB_ERR_INVALID_ARGUMENT, LAB_ERR_UNKNOWN_NAME, LAB_ERR_CUDA = 0, 1, 2, 3
DTYPE_FP16, DTYPE_BF16 = 0, 1
# The LAB_KV_* values of capi/lab_attention.h (lab::KvScheme; common/attn.h says what each stores).
KV_SCHEMES = {"none": 0, "int8_tensor": 1, "int8_token": 2, "int8_head": 3, "int8_group": 4, "fp8_e4m3": 5,
              "fp8_e5m2": 6, "fp8_e4m3_head": 7}


class LabError(RuntimeError):
    """A call into the library failed; `code` is its return code, the message is the library's."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class InvalidArgument(LabError, ValueError, TypeError):
    """A bad argument: the message names it and what is allowed (a ValueError and a TypeError too)."""


class UnknownName(LabError, LookupError):
    """No such chapter or variant."""


class CudaError(LabError):
    """A CUDA or cuBLAS call inside the library failed."""


class LibraryNotFound(InvalidArgument, OSError):
    """liblab_attention.so was not found or does not load (LAB_ATTENTION_LIB): build the lab first."""


class TorchNotFound(InvalidArgument, ImportError):
    """PyTorch is not installed: forward, prepare and quantize_kv take torch tensors."""


# ---- the C structs (capi/lab_attention.h), field for field ----

class LabAttnParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32), ("abi_version", ctypes.c_uint32),
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("o", ctypes.c_void_p), ("lse", ctypes.c_void_p),
        ("q_batch_stride", ctypes.c_int64), ("q_row_stride", ctypes.c_int64), ("q_head_stride", ctypes.c_int64),
        ("k_batch_stride", ctypes.c_int64), ("k_row_stride", ctypes.c_int64), ("k_head_stride", ctypes.c_int64),
        ("v_batch_stride", ctypes.c_int64), ("v_row_stride", ctypes.c_int64), ("v_head_stride", ctypes.c_int64),
        ("o_batch_stride", ctypes.c_int64), ("o_row_stride", ctypes.c_int64), ("o_head_stride", ctypes.c_int64),
        ("dtype", ctypes.c_int32), ("batch", ctypes.c_int32), ("heads_q", ctypes.c_int32),
        ("heads_kv", ctypes.c_int32), ("seqlen_q", ctypes.c_int32), ("seqlen_kv", ctypes.c_int32),
        ("head_dim", ctypes.c_int32), ("softmax_scale", ctypes.c_float), ("causal", ctypes.c_int32),
        ("alibi_slopes", ctypes.c_void_p), ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_kv", ctypes.c_void_p), ("total_q", ctypes.c_int32), ("total_kv", ctypes.c_int32),
        ("cache_seqlens", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p), ("page_size", ctypes.c_int32),
        ("max_pages_per_seq", ctypes.c_int32), ("num_pages", ctypes.c_int32),
        ("num_splits", ctypes.c_int32), ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_uint64),
        ("kv_scheme", ctypes.c_int32), ("kv_group_size", ctypes.c_int32),
        ("kv_k_scale", ctypes.c_void_p), ("kv_v_scale", ctypes.c_void_p),
    ]

    @classmethod
    def new(cls):
        p = cls()
        p.struct_size, p.abi_version = ctypes.sizeof(cls), ABI_VERSION
        return p


class LabSupport(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("num_head_dims", ctypes.c_int32),
                ("head_dims", ctypes.c_int32 * 16), ("max_head_dim", ctypes.c_int32)] + [
        (name, ctypes.c_int32) for name in ("fp16", "bf16", "causal", "gqa", "lse", "alibi", "varlen",
                                            "cache_seqlens", "paged_kv", "splits", "max_seqlen_q",
                                            "vector_elems", "needs_workspace")] + [
        ("kv_schemes", ctypes.c_uint32), ("num_kv_group_sizes", ctypes.c_int32),
        ("kv_group_sizes", ctypes.c_int32 * 8)]


# ---- finding and loading the library ----

_lib = None
_lib_lock = threading.Lock()


def library_path():
    """Where the library is looked for, first match wins; raises LibraryNotFound listing them."""
    tried = []
    env = os.environ.get("LAB_ATTENTION_LIB")
    if env:
        path = pathlib.Path(env)
        candidates = [path / LIB_NAME if path.is_dir() else path]
    else:
        candidates = [REPO_ROOT / b / "lib" / LIB_NAME for b in ("build", "build-gpu")]
    for c in candidates:
        if c.is_file():
            return c
        tried.append(str(c))
    raise LibraryNotFound(f"LAB_ATTENTION_LIB: {LIB_NAME} not found (tried: {', '.join(tried)}); build the lab "
                          "(cmake --build build) or set LAB_ATTENTION_LIB to the library's path")


def load_library():
    """The loaded library (ctypes.CDLL), with argument types set and its layout checked."""
    global _lib
    with _lib_lock:
        if _lib is None:
            path = library_path()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:  # not a shared library, or one that does not load here
                raise LibraryNotFound(f"LAB_ATTENTION_LIB = {str(path)!r} does not load: {e}") from None
            c_char_p, c_int, c_void_p, c_size_t = ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
            params_p = ctypes.POINTER(LabAttnParams)
            for name, restype, argtypes in (
                    ("lab_abi_version", c_int, []),
                    ("lab_params_size", c_size_t, []),
                    ("lab_forward", c_int, [c_char_p, c_char_p, params_p, c_void_p]),
                    ("lab_workspace_bytes", c_int, [c_char_p, c_char_p, params_p, ctypes.POINTER(c_size_t)]),
                    ("lab_last_error", c_char_p, []),
                    ("lab_num_variants", c_int, []),
                    ("lab_variant_chapter", c_char_p, [c_int]),
                    ("lab_variant_name", c_char_p, [c_int]),
                    ("lab_variant_is_default", c_int, [c_int]),
                    ("lab_variant_support", c_int, [c_int, ctypes.POINTER(LabSupport)]),
                    ("lab_kv_scheme_name", c_char_p, [c_int]),
                    ("lab_kv_scale_bytes", c_int, [params_p, c_int, c_int, ctypes.POINTER(c_size_t)]),
                    ("lab_kv_quantize", c_int, [params_p, c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                                c_void_p])):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            if lib.lab_abi_version() != ABI_VERSION or lib.lab_params_size() != ctypes.sizeof(LabAttnParams):
                raise LabError(f"{library_path()}: ABI version {lib.lab_abi_version()} with a "
                               f"{lib.lab_params_size()}-byte LabAttnParams, this module expects version "
                               f"{ABI_VERSION} and {ctypes.sizeof(LabAttnParams)} bytes: rebuild the library")
            _lib = lib
        return _lib


_ERRORS = {LAB_ERR_INVALID_ARGUMENT: InvalidArgument, LAB_ERR_UNKNOWN_NAME: UnknownName, LAB_ERR_CUDA: CudaError}


def _check(lib, rc):
    if rc != LAB_OK:
        message = (lib.lab_last_error() or b"").decode(errors="replace")
        raise _ERRORS.get(rc, LabError)(message or f"liblab_attention returned {rc}", rc)


def _name(s):
    return None if s is None else s.encode()


# ---- what the library offers ----

def read_ceiling_gbps(nbytes=1 << 31):
    """The lab's streaming-read ceiling on the current device, GB/s (lab_read_ceiling_gbps): what a
    decoding kernel's bandwidth is a percentage of. Takes `nbytes` of device memory while it runs."""
    lib = load_library()
    fn = getattr(lib, "lab_read_ceiling_gbps", None)
    if fn is None:
        raise LibraryNotFound(f"{library_path()} has no lab_read_ceiling_gbps: rebuild the library")
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_size_t, ctypes.POINTER(ctypes.c_double)]
    out = ctypes.c_double()
    _check(lib, fn(nbytes, ctypes.byref(out)))
    return out.value


def variants():
    """Every (chapter, variant) pair the library exports: dicts with chapter, variant, default, support."""
    lib = load_library()
    out = []
    for i in range(lib.lab_num_variants()):
        s = LabSupport()
        s.struct_size = ctypes.sizeof(LabSupport)
        _check(lib, lib.lab_variant_support(i, ctypes.byref(s)))
        support = {name: getattr(s, name) for name, _ in LabSupport._fields_
                   if name not in ("struct_size", "num_head_dims", "head_dims", "kv_schemes", "num_kv_group_sizes",
                                   "kv_group_sizes")}
        for flag in ("fp16", "bf16", "causal", "gqa", "lse", "alibi", "varlen", "cache_seqlens", "paged_kv",
                     "splits", "needs_workspace"):
            support[flag] = bool(support[flag])
        support["head_dims"] = list(s.head_dims[:s.num_head_dims])
        # KV cache schemes by name, "none" (a 16-bit cache) first; group sizes for int8_group.
        support["kv_schemes"] = [n for n, bit in KV_SCHEMES.items() if s.kv_schemes >> bit & 1]
        support["kv_group_sizes"] = list(s.kv_group_sizes[:s.num_kv_group_sizes])
        out.append(dict(chapter=lib.lab_variant_chapter(i).decode(), variant=lib.lab_variant_name(i).decode(),
                        default=bool(lib.lab_variant_is_default(i)), support=support))
    return out


def chapters():
    """{chapter directory name: [variant names]}, in lab order."""
    out = {}
    for entry in variants():
        out.setdefault(entry["chapter"], []).append(entry["variant"])
    return out


def support(chapter, variant=None):
    """What one variant computes (head_dims, max_head_dim, bf16, causal, gqa, lse, kv_schemes, ...)."""
    if not isinstance(chapter, str) or (variant is not None and not isinstance(variant, str)):
        raise InvalidArgument(f"chapter = {chapter!r}, variant = {variant!r}: expected names (str), "
                              "e.g. chapter='03' or '03_flash_v2', variant=None for its default")
    for entry in variants():
        if _same_chapter(entry["chapter"], chapter) and (
                entry["variant"] == variant or (not variant and entry["default"])):
            return entry["support"]
    raise UnknownName(f"chapter = {chapter!r}, variant = {variant!r} is unknown (known: {chapters()})",
                      LAB_ERR_UNKNOWN_NAME)


def _same_chapter(name, wanted):
    return wanted == name or (len(wanted) == 2 and name.startswith(wanted + "_"))


# ---- the call ----

def _torch():
    try:
        import torch  # only here: importing the module must not need PyTorch
    except ImportError as e:
        raise TorchNotFound(f"PyTorch is not installed ({e}): lab's tensor functions need it; install a "
                            "CUDA build, e.g. `pip install torch` (see pytorch.org)") from None
    return torch


def _check_tensor(name, t, dtype=None, device=None):
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise InvalidArgument(f"{name}: dtype {t.dtype} does not match {dtype}")
    if t.device.type != "cuda":
        raise InvalidArgument(f"{name}: must be a CUDA tensor, got device {t.device}")
    if device is not None and t.device != device:
        raise InvalidArgument(f"{name}: is on {t.device}, q is on {device}")


def _check_meta(name, t, device, length=None):
    """int32 metadata (cu_seqlens, cache_seqlens, block_table) on q's device, contiguous."""
    torch = _torch()
    _check_tensor(name, t, torch.int32, device)
    if not t.is_contiguous():
        raise InvalidArgument(f"{name}: must be contiguous")
    if length is not None and t.numel() != length:
        raise InvalidArgument(f"{name}: has {t.numel()} elements, expected {length}")
    return t.data_ptr()


def _rows(name, t, dims):
    """(batch stride, row stride, head stride) of a [batch, seqlen, heads, d] or [rows, heads, d] tensor."""
    if t.dim() != dims:
        shape = "[batch, seqlen, heads, head_dim]" if dims == 4 else "[total, heads, head_dim]"
        raise InvalidArgument(f"{name}: expected {dims} dimensions {shape}, got shape {tuple(t.shape)}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidArgument(f"{name}: head_dim stride is {t.stride(-1)}, must be 1 (the last dimension "
                         "contiguous; call .contiguous())")
    return (t.stride(0), t.stride(1), t.stride(2)) if dims == 4 else (0, t.stride(0), t.stride(1))


def _longest(cu_seqlens):
    return int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0


def forward(q, k, v, chapter="03", causal=False, **kwargs):
    """Attention of one lab chapter: returns out, or (out, lse) when lse=True.

    chapter: "03" or "03_flash_v2"; variant: the chapter's step ("mma", "fa2", ...), default its
    main one. causal is aligned bottom-right (FlashAttention's convention). lse is float32
    [batch, heads_q, seqlen_q] (varlen: seqlen_q = max_seqlen_q, and the rows past a sequence's
    end are padding, NaN). Optional, as the chapters support them: alibi_slopes (float32
    [heads_q]; FlashAttention's bias -slope * |i + seqlen_k - seqlen_q - j|, on both sides of the
    diagonal when not causal), varlen (cu_seqlens_q/cu_seqlens_kv int32 [batch + 1], with q, k, v
    packed as [total, heads, head_dim]: cu_seqlens_q[-1] <= q.shape[0], cu_seqlens_kv[-1] <=
    k.shape[0]; max_seqlen_q/kv default to the longest; reading cu_seqlens waits for the current
    stream), cache_seqlens (int32 [batch]: keys per sequence), paged KV (block_table int32
    [batch, max_pages_per_seq], k, v [num_pages, page_size, heads_kv, head_dim]; max_seqlen_kv
    defaults to the table's capacity), num_splits. max_seqlen_q/kv are refused where unused.
    A quantized KV cache (07_kv_quant): kv_scheme ("int8_head", ...; see KV_SCHEMES), kv_group_size
    (int8_group: 32 or 64), k_scale, v_scale, with k, v the 1-byte codes and the scales (torch.float16)
    from quantize_kv() (q and out stay fp16).
    """
    call = prepare(q, k, v, chapter, causal, **kwargs).run()
    return (call.out, call.lse) if kwargs.get("lse") else call.out


class Call:
    """A checked, ready call of one chapter: run() enqueues its kernels again on the stream that was
    current when it was prepared, with no Python-side work (what bench/compare_torch.py times).
    It keeps the tensors it points at alive; out and lse hold the results."""

    def __init__(self, lib, chapter, variant, params, device, stream, out, lse, keep_alive):
        self._lib, self._chapter, self._variant, self._params = lib, chapter, variant, params
        self._device, self._stream, self._keep_alive = device, ctypes.c_void_p(stream), keep_alive
        self.out, self.lse = out, lse

    def run(self):
        with _torch().cuda.device(self._device):
            _check(self._lib, self._lib.lab_forward(self._chapter, self._variant, ctypes.byref(self._params),
                                                    self._stream))
        return self


def _kv_scheme(name, argument="kv_scheme"):
    if name not in KV_SCHEMES:
        raise InvalidArgument(f"{argument} = {name!r} is unknown (known: {', '.join(map(repr, KV_SCHEMES))})")
    return KV_SCHEMES[name]


def _scale_shape(scheme, group_size, slots, rows, heads_kv, head_dim):
    """common/attn.h's layout of one scale tensor; None for a scheme without scales."""
    return {"int8_tensor": (1,), "int8_token": (slots, rows), "int8_head": (slots, heads_kv, rows),
            "int8_group": (slots, heads_kv, rows, head_dim // group_size if group_size else 0),
            "fp8_e4m3_head": (heads_kv,)}.get(scheme)


def _code_dtype(torch, scheme):
    """int8 codes as torch.int8; FP8 codes as PyTorch's FP8 dtype where it has one (E4M3 "fn" is
    NVIDIA's E4M3), so that .float() gives their value; uint8 otherwise."""
    if scheme.startswith("int8"):
        return torch.int8
    return getattr(torch, "float8_e5m2" if scheme == "fp8_e5m2" else "float8_e4m3fn", torch.uint8)


def quantize_kv(k, v, scheme="int8_head", group_size=0):
    """An fp16 KV cache quantized for 07_kv_quant: returns (k_codes, v_codes, k_scale, v_scale).

    k, v: fp16 CUDA tensors [batch, seqlen_kv, heads_kv, head_dim] (or paged: [num_pages, page_size,
    heads_kv, head_dim]; every row is quantized). The codes have k's shape and strides, as torch.int8
    (int8 schemes) or PyTorch's FP8 dtype; the scales are float16 (amax / 127, or / 448, rounded up
    to fp16; the rules are in 07_kv_quant/quantize.h) in common/attn.h's layout:
    int8_tensor [1], int8_token [slots, rows], int8_head [slots, heads_kv, rows], int8_group [slots,
    heads_kv, rows, head_dim / group_size], fp8_e4m3_head [heads_kv], None for fp8_e4m3 and fp8_e5m2
    (slots, rows: k's first two dimensions). int8_tensor and fp8_e4m3_head scales cover this cache.
    Runs on PyTorch's current stream, like forward()."""
    value = _kv_scheme(scheme, "scheme")
    torch = _torch()
    _check_tensor("k", k, torch.float16)
    _check_tensor("v", v, torch.float16, k.device)
    if k.shape != v.shape:
        raise InvalidArgument(f"v: shape {tuple(v.shape)} does not match k's {tuple(k.shape)}")
    k_strides, v_strides = _rows("k", k, 4), _rows("v", v, 4)
    if k_strides != v_strides:  # the codes of K and V share one layout
        k, v = k.contiguous(), v.contiguous()
        k_strides = v_strides = _rows("k", k, 4)
    p = LabAttnParams.new()
    p.k, p.v, p.dtype = k.data_ptr(), v.data_ptr(), DTYPE_FP16
    (p.k_batch_stride, p.k_row_stride, p.k_head_stride) = k_strides
    (p.v_batch_stride, p.v_row_stride, p.v_head_stride) = v_strides
    p.batch, p.seqlen_kv, p.heads_kv, p.head_dim = k.shape
    p.heads_q, p.seqlen_q = p.heads_kv, 1
    lib = load_library()
    scale_bytes = ctypes.c_size_t(0)
    _check(lib, lib.lab_kv_scale_bytes(ctypes.byref(p), value, group_size, ctypes.byref(scale_bytes)))
    dtype = _code_dtype(torch, scheme)
    k_codes, v_codes = (torch.empty_strided(k.shape, k.stride(), dtype=dtype, device=k.device) for _ in range(2))
    shape = _scale_shape(scheme, group_size, *k.shape)
    k_scale = v_scale = None
    if shape is not None:
        if math.prod(shape) * 2 != scale_bytes.value:  # fp16 scales
            raise LabError(f"scales: the library needs {scale_bytes.value} bytes, this module computed {shape}")
        k_scale, v_scale = (torch.empty(shape, dtype=torch.float16, device=k.device) for _ in range(2))
    ptr = lambda t: None if t is None else t.data_ptr()
    with torch.cuda.device(k.device):
        stream = torch.cuda.current_stream(k.device).cuda_stream
        _check(lib, lib.lab_kv_quantize(ctypes.byref(p), value, group_size, ptr(k_codes), ptr(v_codes),
                                        ptr(k_scale), ptr(v_scale), stream))
    return k_codes, v_codes, k_scale, v_scale


def prepare(q, k, v, chapter="03", causal=False, *, variant=None, softmax_scale=None, lse=False,
            alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None,
            max_seqlen_kv=None, cache_seqlens=None, block_table=None, num_splits=0, out=None,
            kv_scheme=None, kv_group_size=0, k_scale=None, v_scale=None):
    """forward()'s checks and allocations, without running: returns a Call (see forward for the arguments)."""
    scheme = _kv_scheme(kv_scheme) if kv_scheme is not None else 0
    # max_seqlen_* size a varlen grid (max_seqlen_kv also a paged cache's capacity); anywhere else
    # they would be silently ignored, so they are refused by name.
    if cu_seqlens_q is None and cu_seqlens_kv is None:
        if max_seqlen_q is not None:
            raise InvalidArgument(f"max_seqlen_q = {max_seqlen_q} is only used with cu_seqlens_q (varlen); "
                                  "dense q has seqlen_q = q.shape[1]", LAB_ERR_INVALID_ARGUMENT)
        if max_seqlen_kv is not None and block_table is None:
            raise InvalidArgument(f"max_seqlen_kv = {max_seqlen_kv} is only used with cu_seqlens_kv (varlen) or "
                                  "block_table (paged KV); dense k has seqlen_kv = k.shape[1]",
                                  LAB_ERR_INVALID_ARGUMENT)
    torch = _torch()
    if isinstance(q, torch.Tensor) and q.dtype not in (torch.float16, torch.bfloat16):
        raise InvalidArgument(f"q: dtype {q.dtype} is not supported (supported: torch.float16, torch.bfloat16)")
    _check_tensor("q", q)
    device = q.device
    if scheme:  # 1-byte codes, of whichever dtype holds them (int8, FP8, uint8)
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t, None, device)
            if t.element_size() != 1:
                raise InvalidArgument(f"{name}: dtype {t.dtype} is not a 1-byte code (kv_scheme = {kv_scheme!r} "
                                "reads codes: see quantize_kv)")
    else:
        _check_tensor("k", k, q.dtype, device)
        _check_tensor("v", v, q.dtype, device)
        if k_scale is not None or v_scale is not None:
            raise InvalidArgument("k_scale/v_scale are given without a kv_scheme")
    if k.shape != v.shape:
        raise InvalidArgument(f"v: shape {tuple(v.shape)} does not match k's {tuple(k.shape)}")
    varlen = cu_seqlens_q is not None or cu_seqlens_kv is not None
    if varlen and (cu_seqlens_q is None or cu_seqlens_kv is None):
        raise InvalidArgument("cu_seqlens_q and cu_seqlens_kv must be given together")
    if varlen and block_table is not None:
        raise InvalidArgument("block_table: paged KV with varlen is not supported by this module")
    dims = 3 if varlen else 4
    q_strides = _rows("q", q, dims)
    k_strides = _rows("k", k, dims)
    v_strides = _rows("v", v, dims)
    if k.shape[-1] != q.shape[-1]:
        raise InvalidArgument(f"k: head_dim {k.shape[-1]} does not match q's {q.shape[-1]}")
    if out is None:
        out = torch.empty_like(q)
    else:
        _check_tensor("out", out, q.dtype, device)
        if out.shape != q.shape:
            raise InvalidArgument(f"out: shape {tuple(out.shape)} does not match q's {tuple(q.shape)}")
    o_strides = _rows("out", out, dims)

    p = LabAttnParams.new()
    p.q, p.k, p.v, p.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    (p.q_batch_stride, p.q_row_stride, p.q_head_stride) = q_strides
    (p.k_batch_stride, p.k_row_stride, p.k_head_stride) = k_strides
    (p.v_batch_stride, p.v_row_stride, p.v_head_stride) = v_strides
    (p.o_batch_stride, p.o_row_stride, p.o_head_stride) = o_strides
    p.dtype = DTYPE_FP16 if q.dtype == torch.float16 else DTYPE_BF16
    p.heads_q, p.heads_kv, p.head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    p.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p.causal = int(bool(causal))
    p.num_splits = num_splits

    if varlen:
        p.batch = cu_seqlens_q.numel() - 1
        p.cu_seqlens_q = _check_meta("cu_seqlens_q", cu_seqlens_q, device)
        p.cu_seqlens_kv = _check_meta("cu_seqlens_kv", cu_seqlens_kv, device, cu_seqlens_q.numel())
        # The packed row counts travel with the problem (the library checks the offsets against
        # them too); refused here first, naming the arguments. Reading cu_seqlens[-1] waits for the
        # current stream, where the library reads the tables as well.
        p.total_q, p.total_kv = q.shape[0], k.shape[0]
        for name, cu, rows, tensor in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q"),
                                       ("cu_seqlens_kv", cu_seqlens_kv, k.shape[0], "k")):
            last = int(cu[-1]) if cu.numel() else 0
            if last > rows:
                raise InvalidArgument(f"{name}[-1] = {last} exceeds {tensor}.shape[0] = {rows} (the packed rows)",
                                      LAB_ERR_INVALID_ARGUMENT)
        # The longest sequence, as FlashAttention's varlen API takes it (computed here if not given).
        p.seqlen_q = max_seqlen_q if max_seqlen_q is not None else _longest(cu_seqlens_q)
        p.seqlen_kv = max_seqlen_kv if max_seqlen_kv is not None else _longest(cu_seqlens_kv)
    else:
        p.batch, p.seqlen_q = q.shape[0], q.shape[1]
        if block_table is None:
            if k.shape[0] != q.shape[0]:
                raise InvalidArgument(f"k: batch {k.shape[0]} does not match q's {q.shape[0]}")
            p.seqlen_kv = k.shape[1]
        else:
            if block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
                raise InvalidArgument(f"block_table: expected [batch = {q.shape[0]}, max_pages_per_seq], "
                                 f"got shape {tuple(block_table.shape)}")
            p.block_table = _check_meta("block_table", block_table, device)
            p.num_pages, p.page_size, p.max_pages_per_seq = k.shape[0], k.shape[1], block_table.shape[1]
            p.seqlen_kv = max_seqlen_kv if max_seqlen_kv is not None else p.max_pages_per_seq * p.page_size
    if cache_seqlens is not None:
        p.cache_seqlens = _check_meta("cache_seqlens", cache_seqlens, device, p.batch)
    if scheme:
        p.kv_scheme, p.kv_group_size = scheme, kv_group_size
        shape = _scale_shape(kv_scheme, kv_group_size, p.num_pages if block_table is not None else p.batch,
                             p.page_size if block_table is not None else p.seqlen_kv, p.heads_kv, p.head_dim)
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            if t is None or shape is None:
                continue  # the library refuses a missing scale, or one given for a scheme without
            _check_tensor(name, t, torch.float16, device)  # refuses float32 scales (ABI 3's) by name
            if not t.is_contiguous() or t.numel() < math.prod(shape):  # never read past its end
                raise InvalidArgument(f"{name}: expected a contiguous float16 tensor of {math.prod(shape)} elements "
                                 f"{shape} for {kv_scheme}, got shape {tuple(t.shape)}")
        p.kv_k_scale = None if k_scale is None else k_scale.data_ptr()
        p.kv_v_scale = None if v_scale is None else v_scale.data_ptr()
    if alibi_slopes is not None:
        _check_tensor("alibi_slopes", alibi_slopes, torch.float32, device)
        if not alibi_slopes.is_contiguous() or alibi_slopes.numel() != p.heads_q:
            raise InvalidArgument(f"alibi_slopes: expected a contiguous float32 [heads_q = {p.heads_q}] tensor, "
                             f"got shape {tuple(alibi_slopes.shape)}")
        p.alibi_slopes = alibi_slopes.data_ptr()
    lse_out = None
    if lse:
        lse_shape = (p.batch, p.heads_q, p.seqlen_q)
        # varlen: rows past a sequence's end are never written; they hold NaN (no row there).
        lse_out = torch.full(lse_shape, float("nan"), dtype=torch.float32, device=device) if varlen else \
            torch.empty(lse_shape, dtype=torch.float32, device=device)
        p.lse = lse_out.data_ptr()

    lib = load_library()
    ch, var = _name(chapter), _name(variant)
    bytes_needed = ctypes.c_size_t(0)
    with torch.cuda.device(device):  # a split-KV chapter sizes its workspace for this device's SMs
        _check(lib, lib.lab_workspace_bytes(ch, var, ctypes.byref(p), ctypes.byref(bytes_needed)))
    workspace = None
    if bytes_needed.value:
        # Allocated on the current stream: once the Call is dropped, PyTorch's allocator reuses it
        # only for work ordered after the kernels on that stream.
        workspace = torch.empty(bytes_needed.value, dtype=torch.uint8, device=device)
        p.workspace, p.workspace_bytes = workspace.data_ptr(), bytes_needed.value
    stream = torch.cuda.current_stream(device).cuda_stream
    keep_alive = (q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_kv, cache_seqlens, block_table, workspace,
                  k_scale, v_scale)
    return Call(lib, ch, var, p, device, stream, out, lse_out, keep_alive)
