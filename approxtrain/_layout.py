"""How the approximate ops move their sampled slices in memory: taking slices, spreading
sampled results back to full size, and the pair norms -- each in the way the CPU runs
fastest for the tensor's layout (the values are those of the plain ops).

* :func:`take` -- ``t.index_select(dim, keep)``;
* :func:`spread` -- zeros holding ``values`` at ``keep`` along ``dim`` (repeats sum up);
* :func:`matmul_into` -- ``a @ b`` spread along ``dim``, written once where it can be;
* :func:`norms` -- the Euclidean norm of each slice along ``dim``.

With the ``triton`` kernel backend (:mod:`approxtrain.kernels`) the row-major / NHWC cases run as
one fused kernel each on the GPU: the norms in one fp32 pass, the column gathers and spreads
reading the kept list once per tile (no full-size int64 index), each element written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from approxtrain import kernels
from approxtrain.profiling import SCATTER_RANGE, profiler_range
from approxtrain.sampling import Selection


def is_column_major(t: Tensor) -> bool:
    """Whether a 2-D ``(out, n)`` tensor is stored column-major (strides ``(1, out)``): its
    transpose is contiguous, so its columns are contiguous rows of ``t^T``."""
    return t.dim() == 2 and t.shape[0] > 1 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


def is_channels_last(t: Tensor) -> bool:
    """Whether a 4-D tensor is channels_last (and not also plainly contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def take(t: Tensor, dim: int, keep: Tensor) -> Tensor:
    """``t.index_select(dim, keep)``, in ``t``'s layout.

    Along the innermost (stride-1) dimension -- the last one, or the channels of a
    channels_last tensor -- a ``gather`` with a broadcast index, about twice as fast on
    CPU as ``index_select`` there; the columns of a column-major matrix as whole rows of
    its transpose.
    """
    if dim == 1 and is_column_major(t):
        return t.t().index_select(0, keep).t()
    rows = _row_major_columns(t, dim, "columns")
    if rows is not None:
        taken = kernels.take_columns(rows, keep)
        return taken if t.dim() == 2 else taken.view(*t.shape[:1], *t.shape[2:], -1).permute(0, 3, 1, 2)
    if dim == t.dim() - 1:
        return _take_last(t, keep)
    if dim == 1 and is_channels_last(t):
        return _take_last(t.permute(0, 2, 3, 1), keep).permute(0, 3, 1, 2)
    return t.index_select(dim, keep)


def _row_major_columns(t: Tensor, dim: int, piece: str) -> Tensor | None:
    """``t`` as the row-major ``(M, n)`` matrix whose columns are its slices along ``dim`` (a 2-D
    row-major matrix's columns, an NHWC tensor's channels) when the Triton kernel of ``piece``
    serves it, else None."""
    if not kernels.enabled(t, piece) or t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or dim != 1:
        return None
    if t.dim() == 2 and t.stride(1) == 1 and t.stride(0) == t.shape[1]:
        return t
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return None


def _take_last(t: Tensor, keep: Tensor) -> Tensor:
    shape = [1] * (t.dim() - 1) + [-1]
    return torch.gather(t, t.dim() - 1, keep.view(shape).expand(*t.shape[:-1], keep.numel()))


def spread(values: Tensor, dim: int, n: int, selection: Selection, channels_last: bool = False) -> Tensor:
    """``values`` (``k`` slices along ``dim``) at ``selection.keep`` of a zero tensor with ``n``
    slices there; repeated indices sum up. ``channels_last``: the result is (4-D only).

    Along the innermost (stride-1) dimension a ``scatter_`` with a broadcast index is about
    twice as fast on CPU as ``index_copy_``; along an outer one (NCHW channels: whole
    planes) ``index_copy_`` is about twice as fast as ``scatter_``.
    """
    with profiler_range(SCATTER_RANGE):
        rows = _row_major_columns(values, dim, "columns") if selection.unique and (channels_last or values.dim() == 2) else None
        if rows is not None:
            out = kernels.spread_columns(rows, selection.keep, n)
            return out if values.dim() == 2 else out.view(*values.shape[:1], *values.shape[2:], n).permute(0, 3, 1, 2)
        shape = list(values.shape)
        shape[dim] = n
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(shape, dtype=values.dtype, device=values.device, memory_format=memory_format).zero_()
        if out.stride(dim) != 1 or dim != out.dim() - 1 and out.dim() != 4:
            if selection.unique:
                return out.index_copy_(dim, selection.keep, values)
            return out.index_add_(dim, selection.keep, values)
        target, source, last = out, values, dim
        if dim != out.dim() - 1:  # channels_last: scatter in the NHWC view, where the channels are the last dim
            target, source, last = out.permute(0, 2, 3, 1), values.permute(0, 2, 3, 1), 3
        index_shape = [1] * source.dim()
        index_shape[last] = -1
        index = selection.keep.view(index_shape).expand_as(source)
        if selection.unique:
            target.scatter_(last, index, source)
        else:
            target.scatter_add_(last, index, source)
        return out


# Row padding of the buffer a product is written into before its columns are spread
# out: one zero column, rounded up so the buffer's rows stay 64-byte aligned (an odd
# leading dimension makes the CPU GEMM about 35 % slower).
_SPREAD_PAD_BYTES = 64
# Below this many result elements zero-fill + scatter is the cheaper of the two (fewer ops).
_SPREAD_GATHER_MIN_ELEMENTS = 1 << 19


def matmul_into(a: Tensor, b: Tensor, dim: int, n: int, selection: Selection, column_major: bool = False) -> Tensor:
    """``a @ b`` spread along ``dim`` (1: its ``k`` columns, 0: its ``k`` rows) to
    ``selection.keep`` of ``n``, zero elsewhere; ``column_major``: the result stored so.

    With distinct indices the product is written into a buffer with a zero column (row)
    after its ``k`` columns (rows) and the result is *gathered* from it, so every element
    is written once; zero-filling and then scattering writes the kept ones twice.
    Repeated indices (sampling with replacement) sum up through a scatter; a
    differentiable backward (``create_graph=True``), a traced one and small results take
    that plain path as well (``out=`` products do not record gradients).
    """
    if column_major:  # rows of the transpose: (a @ b)^T = b^T a^T
        return matmul_into(b.t(), a.t(), 1 - dim, n, selection).t()
    rows, cols = (a.shape[0], n) if dim == 1 else (n, b.shape[1])
    if (not selection.unique or rows * cols < _SPREAD_GATHER_MIN_ELEMENTS or torch.is_grad_enabled()
            or torch.compiler.is_compiling()):
        return spread(a @ b, dim, n, selection)
    dtype = torch.result_type(a, b)
    k = selection.keep.numel()
    if dim == 0:
        buffer = torch.empty(k + 1, cols, dtype=dtype, device=a.device)
        torch.mm(a, b, out=buffer[:k])
        with profiler_range(SCATTER_RANGE):
            buffer[k].zero_()
            return buffer.index_select(0, _source_index(selection, n))
    pad = max(1, _SPREAD_PAD_BYTES // dtype.itemsize)
    buffer = torch.empty(rows, (k + pad) // pad * pad, dtype=dtype, device=a.device)
    torch.mm(a, b, out=buffer[:, :k])
    with profiler_range(SCATTER_RANGE):
        buffer[:, k].zero_()
        return torch.gather(buffer, 1, _source_index(selection, n).view(1, n).expand(rows, n))


def _source_index(selection: Selection, n: int) -> Tensor:
    """``(n,)``: for each of the ``n`` pairs its position in ``selection.keep``, or ``k`` if dropped."""
    k = selection.keep.numel()
    source = torch.full((n,), k, dtype=torch.long, device=selection.keep.device)
    source[selection.keep] = torch.arange(k, device=selection.keep.device)
    return source


def norms(t: Tensor, dim: int) -> Tensor:
    """Euclidean norm of each slice of ``t`` along ``dim`` -> ``(t.shape[dim],)``, accumulated
    in at least float32 (bf16/fp16 inputs), else in ``t``'s dtype.

    ``dim=0``: one reduction over the other dimensions. ``dim=1``: the columns of a
    matrix (:func:`_column_norms`) or the channels of an ``(N, C, H, W)`` tensor
    (:func:`_channel_norms`), each by the reduction the CPU runs fastest for the layout.
    """
    if dim == 0:
        return _norm(t, tuple(range(1, t.dim())))
    rows = _row_major_columns(t, dim, "scores")
    if rows is not None:
        return kernels.column_sq_sums(rows).sqrt()
    if t.dim() == 2:
        return _column_norms(t)
    return _channel_norms(t)


def _norm_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def _norm(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    return torch.linalg.vector_norm(t, dim=dim, dtype=_norm_dtype(t))


# Column norms of a tall matrix are summed over blocks of this many elements: a
# single reduction over dim 0 of a large matrix is many times slower on CPU.
_NORM_BLOCK_ELEMENTS = 1 << 20


def _column_norms(a: Tensor) -> Tensor:
    """Norm of each column of ``a: (M, n)``.

    On CPU the squares are summed over blocks of rows, and a large matrix is first cut
    into one slab of whole rows per thread: ``vector_norm`` over dim 0 is several times
    slower there, and so, in some processes, is a reduction whose threads share rows.
    """
    if not a.is_contiguous() and a.t().is_contiguous():  # column-major: row norms of a^T
        return _norm(a.t(), 1)
    if a.device.type != "cpu" or torch.compiler.is_compiling():  # (inductor writes its own reduction)
        return _norm(a, 0)
    dtype = _norm_dtype(a)

    def sum_of_squares(block: Tensor, dim: int) -> Tensor:  # squared in the accumulation dtype, not in bf16
        squares = block.square() if block.dtype == dtype else block.to(dtype).square_()
        return squares.sum(dim)

    rows, n = a.shape
    threads = max(1, torch.get_num_threads())
    if rows * n <= _NORM_BLOCK_ELEMENTS or rows < 2 * threads or not a.is_contiguous():
        return sum_of_squares(a, 0).sqrt_()
    per_thread = rows // threads
    slabs = a[: per_thread * threads].view(threads, per_thread, n)
    total = torch.zeros(threads, n, dtype=dtype, device=a.device)
    for block in slabs.split(max(1, _NORM_BLOCK_ELEMENTS // (threads * n)), dim=1):
        total += sum_of_squares(block, 1)
    total = total.sum(0)
    if rows > per_thread * threads:
        total += sum_of_squares(a[per_thread * threads:], 0)
    return total.sqrt_()


def _channel_norms(t: Tensor) -> Tensor:
    """Frobenius norm of each channel ``t[:, c]`` of ``t: (N, C, H, W)``, under any memory format.

    NCHW: norms of the contiguous ``(N, C, H*W)`` rows first, then over the batch (a
    reduction over dims (0, 2, 3) at once is several times slower on CPU).
    """
    if is_channels_last(t):
        return _column_norms(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]))
    if not t.is_contiguous():
        return _norm(t, (0, 2, 3))
    per_sample = _norm(t.view(t.shape[0], t.shape[1], -1), 2)
    return torch.linalg.vector_norm(per_sample, dim=0)
