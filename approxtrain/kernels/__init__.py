"""Fused GPU kernels for the approximate ops' sampling pieces, as ``torch.library`` custom ops.

One backend is chosen per process: ``APPROXTRAIN_KERNELS=torch`` (the default: plain torch
ops everywhere), ``triton`` (the Triton kernels of :mod:`approxtrain.kernels.triton_kernels`
for every piece, on CUDA tensors; ``TRITON_INTERPRET=1`` also runs them on the CPU, slowly,
for tests) or ``triton:<piece>,...`` (the kernels of the pieces named, torch for the rest;
see :data:`PIECES`). Each op gives the values of the torch path it replaces (fp32
accumulation; the top-k's ties go to the lower index):

* :func:`column_sq_sums` -- ``x.float().square().sum(0)`` of a row-major ``(M, n)`` matrix, one pass;
* :func:`topk_indices` -- ``torch.topk(scores, k).indices.sort().values`` without a sort;
* :func:`gather_mm` -- a product whose operands read only the kept slices, its result written
  straight into a full-size (zero elsewhere) buffer where asked;
* :func:`take_columns` / :func:`spread_columns` -- ``x[:, keep]`` and its inverse (zeros elsewhere).

They are custom ops with fake (meta) implementations, so ``torch.compile`` treats each as one
opaque node without a graph break.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

BACKENDS = ("torch", "triton")
# What each kernel serves: the pair scores (column_sq_sums), the top-k (topk_indices), the
# gathers and spreads of row-major / channels_last columns (take_columns, spread_columns) and
# the linear's products (gather_mm). A GPU measurement decides each one's default.
PIECES = ("scores", "topk", "columns", "linear")
_ENV = "APPROXTRAIN_KERNELS"
# The rank-counting top-k compares every pair of scores: past this many it is the slower one.
TOPK_MAX_N = 8192


@functools.cache
def _tk():
    """The kernels module, imported on first use: Triton decides at import whether they run
    compiled or interpreted (``TRITON_INTERPRET=1``)."""
    from approxtrain.kernels import triton_kernels
    return triton_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def parse_backend(name: str, key: str | None = None) -> frozenset[str]:
    """The pieces a backend name runs as Triton kernels: ``torch`` none, ``triton`` all of
    :data:`PIECES`, ``triton:scores,topk`` those named; ``key``: the setting that gave it, for errors."""
    what = f"{key}={name!r}" if key else f"kernel backend {name!r}"
    allowed = f"allowed: torch, triton, triton:<pieces> with pieces from {', '.join(PIECES)}"
    kind, colon, listed = name.partition(":")
    pieces = frozenset(listed.split(",")) if colon else frozenset(PIECES)
    if kind not in BACKENDS or (kind == "torch" and colon) or not pieces <= set(PIECES):
        raise ValueError(f"{what} is invalid; {allowed}")
    if kind == "torch":
        return frozenset()
    if not _has_triton():
        raise ValueError(f"{what} needs the triton package, which is not installed; allowed: torch")
    return pieces


def _pieces_from_env() -> tuple[str, frozenset[str]]:
    name = os.environ.get(_ENV, "torch")
    return name, parse_backend(name, _ENV)


_backend, _pieces = _pieces_from_env()


def backend() -> str:
    """The kernel backend of this process, as set (``torch``, ``triton`` or ``triton:<pieces>``)."""
    return _backend


def set_backend(name: str) -> None:
    """Choose the kernel backend (``torch``, ``triton`` or ``triton:<pieces>``) for the ops that follow."""
    global _backend, _pieces
    _pieces = parse_backend(name)
    _backend = name


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled(t: Tensor, piece: str) -> bool:
    """Whether the Triton kernel of ``piece`` (one of :data:`PIECES`) serves ``t``: the backend
    runs that piece, on CUDA (or the interpreter)."""
    return piece in _pieces and (t.is_cuda or interpreting())


def _mm_blocks(rows: int, cols: int) -> dict:
    if interpreting():
        return {"BLOCK_I": 16, "BLOCK_J": 16, "BLOCK_R": 16, "GROUP_I": 2, "num_warps": 4}
    # Hopper: 128x128 tiles with 64-deep steps feed the bf16 tensor cores (wgmma) from 3 stages
    block_i = 128 if rows >= 128 else 64
    block_j = 128 if cols >= 128 else 64
    return {"BLOCK_I": block_i, "BLOCK_J": block_j, "BLOCK_R": 64, "GROUP_I": 8, "num_warps": 8, "num_stages": 3}


@torch.library.custom_op("approxtrain::column_sq_sums", mutates_args=())
def column_sq_sums(x: Tensor) -> Tensor:
    """``(n,)`` float32: the sum of squares of each column of ``x: (M, n)`` (``x.stride(1) == 1``)."""
    rows, n = x.shape
    block_n = 16 if interpreting() else 64
    block_m = 16 if interpreting() else 64
    col_programs = _cdiv(n, block_n)
    # programs wanted: ~4 per SM; interpreted, 2 row slabs (the tests' shapes cover one slab and several)
    want = 2 * col_programs if interpreting() else 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    slabs = max(1, min(_cdiv(want, col_programs), _cdiv(rows, block_m)))
    rows_per_program = _cdiv(_cdiv(rows, slabs), block_m) * block_m
    slabs = _cdiv(rows, rows_per_program) if rows else 1
    if not rows:
        return torch.zeros(n, dtype=torch.float32, device=x.device)
    partial = torch.empty(slabs, n, dtype=torch.float32, device=x.device)  # every program writes its row
    _tk().column_sq_sums_kernel[(col_programs, slabs)](x, partial, rows, n, x.stride(0), rows_per_program,
                                                       BLOCK_M=block_m, BLOCK_N=block_n)
    return partial[0] if slabs == 1 else partial.sum(0)


@column_sq_sums.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=torch.float32)


def serves_topk(scores: Tensor, k: int) -> bool:
    """Whether :func:`topk_indices` serves a top-``k`` of ``scores: (n,)``: the kernels are enabled and ``k < n <= TOPK_MAX_N``."""
    return k < scores.numel() <= TOPK_MAX_N and enabled(scores, "topk")


@torch.library.custom_op("approxtrain::topk_indices", mutates_args=())
def topk_indices(scores: Tensor, k: int) -> Tensor:
    """``(k,)`` int64: the indices of the ``k`` largest of ``scores: (n,)``, ascending (``n <= TOPK_MAX_N``)."""
    n = scores.numel()
    scores = scores.float().contiguous()
    block_i, block_j = (16, 16) if interpreting() else (64, 128)
    keep_mask = torch.empty(n, dtype=torch.int32, device=scores.device)
    _tk().topk_mask_kernel[(_cdiv(n, block_i),)](scores, keep_mask, n, k, BLOCK_I=block_i, BLOCK_J=block_j)
    keep = torch.empty(k, dtype=torch.long, device=scores.device)
    _tk().compact_kernel[(1,)](keep_mask, keep, n, BLOCK=64 if interpreting() else 1024)
    return keep


@topk_indices.register_fake
def _(scores: Tensor, k: int) -> Tensor:
    return scores.new_empty(k, dtype=torch.long)


def _fp32_dot_precision() -> str:
    """How ``tl.dot`` multiplies fp32 operands: as torch's own fp32 matmuls do, in full precision
    (``ieee``) unless TF32 is allowed (``torch.backends.cuda.matmul.allow_tf32``, or
    ``torch.set_float32_matmul_precision("high")``). Triton's default would be TF32 (ignored for bf16)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@torch.library.custom_op("approxtrain::gather_mm", mutates_args=())
def gather_mm(a: Tensor, b: Tensor, keep: Tensor, scale: Tensor | None, axis: int, gather_a: bool, gather_b: bool,
              rows: int, cols: int) -> Tensor:
    """``C (rows, cols)``, row-major, ``a.dtype``: ``C = a @ b`` over the logical sizes ``(I, R) @ (R, J)``
    where the axis ``axis`` (0: I, 1: R, 2: J) is ``keep``'s ``k`` slices: ``a``/``b`` read at ``keep``
    there when ``gather_a``/``gather_b`` (else they hold just the k slices), ``scale`` multiplies the
    kept slices. ``C``'s kept axis (I or J) is written at ``keep`` of ``rows``/``cols``, the rest zero;
    with ``axis=1`` ``C`` is the whole ``(I, J)`` product."""
    k = keep.numel()
    i_size = k if axis == 0 else (a.shape[0])
    r_size = k if axis == 1 else (a.shape[1])
    j_size = k if axis == 2 else (b.shape[1])
    c = torch.zeros if axis != 1 else torch.empty
    out = c(rows, cols, dtype=a.dtype, device=a.device)
    if i_size == 0 or j_size == 0:
        return out
    blocks = _mm_blocks(i_size, j_size)
    grid = (_cdiv(i_size, blocks["BLOCK_I"]) * _cdiv(j_size, blocks["BLOCK_J"]),)
    _tk().gather_matmul_kernel[grid](a, b, out, keep, scale if scale is not None else keep, i_size, j_size, r_size,
                                   a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                                   AXIS=axis, GATHER_A=gather_a, GATHER_B=gather_b, GATHER_C=axis != 1,
                                   HAS_SCALE=scale is not None, INPUT_PRECISION=_fp32_dot_precision(), **blocks)
    return out


@gather_mm.register_fake
def _(a, b, keep, scale, axis, gather_a, gather_b, rows, cols):
    return a.new_empty(rows, cols)


@torch.library.custom_op("approxtrain::take_columns", mutates_args=())
def take_columns(x: Tensor, keep: Tensor) -> Tensor:
    """``x[:, keep]`` of ``x: (M, n)`` with ``x.stride(1) == 1``, contiguous ``(M, k)``."""
    rows, k = x.shape[0], keep.numel()
    out = x.new_empty(rows, k)
    block_m, block_k = (16, 16) if interpreting() else (32, 128)
    if rows and k:
        _tk().take_columns_kernel[(_cdiv(rows, block_m), _cdiv(k, block_k))](
            x, keep, out, rows, k, x.stride(0), BLOCK_M=block_m, BLOCK_K=block_k)
    return out


@take_columns.register_fake
def _(x: Tensor, keep: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], keep.numel())


@torch.library.custom_op("approxtrain::spread_columns", mutates_args=())
def spread_columns(g: Tensor, keep: Tensor, n: int) -> Tensor:
    """``(M, n)`` contiguous: ``g (M, k)``'s columns at ``keep`` (distinct), zeros elsewhere, each element written once."""
    g = g.contiguous()
    rows, k = g.shape
    source = torch.full((n,), k, dtype=torch.long, device=g.device)
    source.scatter_(0, keep, torch.arange(k, device=g.device))
    out = g.new_empty(rows, n)
    block_m, block_n = (16, 16) if interpreting() else (32, 128)
    if rows and n:
        _tk().spread_columns_kernel[(_cdiv(rows, block_m), _cdiv(n, block_n))](
            g, source, out, rows, n, k, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


@spread_columns.register_fake
def _(g: Tensor, keep: Tensor, n: int) -> Tensor:
    return g.new_empty(g.shape[0], n)
