"""Approximate tensor operations: column-row sampled (CRS) linear and conv2d.

The math lives here, as plain functions over tensors; :mod:`approxtrain.modules`
holds the thin modules. Forward multiplies only the sampled slices; backward flows
through the samples only, so both backward products shrink by the same ratio and
only the sampled slice of the input is saved for backward:

* linear, input ``X: (M, n)``, weight ``W: (out, n)``: keep columns ``S`` of ``X``
  and of ``W``, ``Y = X[:, S] (W[:, S] D)^T + b``;
  ``dX[:, S] = dY W[:, S] D`` and ``dW[:, S] = (dY^T X[:, S]) D``, zero elsewhere.
* conv2d, input ``I: (N, C, H, W)``, kernel ``K: (O, C, kh, kw)``: keep input channels
  ``S``, ``O = I[:, S] * (K[:, S] D)`` (Eq. 6), gradients likewise.

``D`` is the diagonal of the selection's scale factors (identity without scaling),
applied by broadcasting. Optional extra backward sampling (paper Sec. 5):
``bwd_ratio`` samples the input-gradient product over its inner dimension (output
features/channels) and ``wu_ratio`` the weight-gradient product over its inner
dimension (batch rows; batch samples for a convolution), with the layer's policy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxtrain.accounting import LayerCompute, conv2d_macs, linear_macs
from approxtrain.sampling import SamplingConfig, Selection, select

# Profiler ranges: benchmarks attribute time to selection (norms + sampling),
# gathers and scatters by these names (cheap when no profiler is running).
SELECT_RANGE, GATHER_RANGE, SCATTER_RANGE = "approxtrain::select", "approxtrain::gather", "approxtrain::scatter"


def _range(name: str) -> contextlib.AbstractContextManager:
    """A profiler range, or nothing while ``torch.compile`` traces (it ignores ranges)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch.profiler.record_function(name)

_convolution_backward = torch.ops.aten.convolution_backward.default


def _scatter_columns(full_shape: torch.Size, dim: int, selection: Selection, values: Tensor,
                     memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """A zero tensor of ``full_shape`` holding ``values`` at ``selection.keep`` along ``dim``; repeated indices sum up.

    Along the innermost (stride-1) dimension a ``scatter_`` with a broadcast (zero-stride)
    index is about twice as fast on CPU as ``index_copy_``; along an outer one (NCHW
    channels: whole planes) ``index_copy_`` is about twice as fast as ``scatter_``.
    """
    out = torch.empty(full_shape, dtype=values.dtype, device=values.device, memory_format=memory_format).zero_()
    if out.stride(dim) != 1 or dim != out.dim() - 1 and out.dim() != 4:
        if selection.unique:
            return out.index_copy_(dim, selection.keep, values)
        return out.index_add_(dim, selection.keep, values)
    target, source, last = out, values, dim
    if dim != out.dim() - 1:  # channels_last: scatter in the NHWC view, where the channels are the last dim
        target, source, last = out.permute(0, 2, 3, 1), values.permute(0, 2, 3, 1), 3
    shape = [1] * source.dim()
    shape[last] = -1
    index = selection.keep.view(shape).expand_as(source)
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


def _spread_plainly(selection: Selection, elements: int) -> bool:
    """Whether a product of ``elements`` result elements is spread by zero-fill + scatter
    rather than through a padded buffer (see :func:`_matmul_into_columns`)."""
    return (not selection.unique or elements < _SPREAD_GATHER_MIN_ELEMENTS or torch.is_grad_enabled()
            or torch.compiler.is_compiling())


def _matmul_then_scatter(a: Tensor, b: Tensor, full_shape: torch.Size, dim: int, selection: Selection) -> Tensor:
    product = a @ b
    with _range(SCATTER_RANGE):
        return _scatter_columns(full_shape, dim, selection, product)


def _matmul_into_columns(a: Tensor, b: Tensor, n: int, selection: Selection) -> Tensor:
    """``a @ b`` ((R, k)) at columns ``selection.keep`` of an ``(R, n)`` tensor, zero elsewhere.

    With distinct indices the product is written into a buffer with a zero column after
    its ``k`` columns and the result is *gathered* from it, so every element of the
    result is written once; zero-filling and then scattering writes the kept columns
    twice. Repeated indices (sampling with replacement) sum up through ``scatter_add_``;
    a differentiable backward (``create_graph=True``), a traced one and small results take
    that plain path as well (``out=`` products do not record gradients).
    """
    rows, k = a.shape[0], b.shape[1]
    if _spread_plainly(selection, rows * n):
        return _matmul_then_scatter(a, b, torch.Size((rows, n)), 1, selection)
    dtype = torch.result_type(a, b)
    pad = max(1, _SPREAD_PAD_BYTES // dtype.itemsize)
    width = (k + pad) // pad * pad
    buffer = torch.empty(rows, width, dtype=dtype, device=a.device)
    torch.mm(a, b, out=buffer[:, :k])
    with _range(SCATTER_RANGE):
        buffer[:, k].zero_()
        return torch.gather(buffer, 1, _source_index(selection, n).view(1, n).expand(rows, n))


def is_column_major(weight: Tensor) -> bool:
    """Whether a 2-D ``(out, n)`` weight is stored column-major (strides ``(1, out)``): its
    transpose is contiguous, so the columns sampling picks are contiguous rows of ``W^T``."""
    return weight.dim() == 2 and weight.shape[0] > 1 and weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]


def _weight_columns(weight: Tensor, selection: Selection) -> Tensor:
    """``W[:, keep] * scale`` as an ``(out, k)`` tensor; for a column-major weight it is the
    transpose of ``W^T[keep]``, rows copied whole."""
    if is_column_major(weight):
        rows = weight.t().index_select(0, selection.keep)
        if selection.scale is not None:
            rows = rows * selection.scale.to(rows.dtype).unsqueeze(1)
        return rows.t()
    columns = _take_last(weight, selection.keep)
    if selection.scale is not None:
        columns = columns * selection.scale.to(columns.dtype)
    return columns


def _matmul_into_rows(a: Tensor, b: Tensor, n: int, selection: Selection) -> Tensor:
    """``a @ b`` ((k, C)) at rows ``selection.keep`` of an ``(n, C)`` tensor, zero elsewhere.

    As :func:`_matmul_into_columns`, along the rows: with distinct indices the product goes
    into a buffer with one zero row after its ``k`` rows and whole rows are selected from it.
    """
    k, cols = a.shape[0], b.shape[1]
    if _spread_plainly(selection, n * cols):
        return _matmul_then_scatter(a, b, torch.Size((n, cols)), 0, selection)
    buffer = torch.empty(k + 1, cols, dtype=torch.result_type(a, b), device=a.device)
    torch.mm(a, b, out=buffer[:k])
    with _range(SCATTER_RANGE):
        buffer[k].zero_()
        return buffer.index_select(0, _source_index(selection, n))


def _source_index(selection: Selection, n: int) -> Tensor:
    """``(n,)``: for each of the ``n`` pairs its position in ``selection.keep``, or ``k`` if dropped."""
    k = selection.keep.numel()
    source = torch.full((n,), k, dtype=torch.long, device=selection.keep.device)
    source[selection.keep] = torch.arange(k, device=selection.keep.device)
    return source


def _take_last(a: Tensor, keep: Tensor) -> Tensor:
    """``a[..., keep]``: ``gather`` with a broadcast index, about twice as fast on CPU as
    ``index_select`` along the innermost dimension."""
    shape = [1] * (a.dim() - 1) + [-1]
    return torch.gather(a, a.dim() - 1, keep.view(shape).expand(*a.shape[:-1], keep.numel()))


def _take_channels(x: Tensor, keep: Tensor) -> Tensor:
    """``x[:, keep]`` for (N, C, H, W) ``x``, gathering along the contiguous dimension under channels_last."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return _take_last(x.permute(0, 2, 3, 1), keep).permute(0, 3, 1, 2)
    return x.index_select(1, keep)


def _scale_view(scale: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return scale.view(shape)


def kept_by_producer(t: Tensor) -> bool:
    """Whether autograd already keeps ``t`` itself for backward: the op that produced it
    saved its own result (ReLU, sigmoid, tanh, ...). A layer that then saves the full
    ``t`` adds no memory, where saving its sampled slice would be a new copy."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():  # (dynamo cannot trace grad_fn)
        return False
    node = t.grad_fn
    if node is None:
        return False
    try:
        saved = getattr(node, "_saved_result", None)
    except RuntimeError:  # already freed by an earlier backward
        return False
    return (isinstance(saved, Tensor) and saved.data_ptr() == t.data_ptr() and saved.dtype == t.dtype
            and saved.shape == t.shape and saved.stride() == t.stride())


# Column norms of a tall matrix are summed over blocks of this many elements: a
# single reduction over dim 0 of a large matrix is many times slower on CPU.
_NORM_BLOCK_ELEMENTS = 1 << 20


def _norm_dtype(t: Tensor) -> torch.dtype:
    """Norms accumulate in at least float32 (bf16/fp16 inputs), else in the input's dtype."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def _norm(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    return torch.linalg.vector_norm(t, dim=dim, dtype=_norm_dtype(t))


def column_norms(a: Tensor) -> Tensor:
    """Euclidean norm of each column of ``a: (M, n)`` -> ``(n,)`` (float32 for half inputs).

    On CPU the squares are summed over blocks of rows, and a large matrix is first cut
    into one slab of whole rows per thread: ``vector_norm`` over dim 0 is several times
    slower there, and so, in some processes, is a reduction whose threads share rows.
    """
    if a.dim() == 2 and not a.is_contiguous() and a.t().is_contiguous():  # column-major: row norms of a^T
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


def channel_norms(t: Tensor) -> Tensor:
    """Frobenius norm of each channel ``t[:, c]`` of ``t: (N, C, H, W)`` -> ``(C,)``, under any memory format.

    NCHW: norms of the contiguous ``(N, C, H*W)`` rows first, then over the batch (a
    reduction over dims (0, 2, 3) at once is several times slower on CPU).
    """
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return column_norms(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]))
    if not t.is_contiguous():
        return _norm(t, (0, 2, 3))
    per_sample = _norm(t.view(t.shape[0], t.shape[1], -1), 2)
    return torch.linalg.vector_norm(per_sample, dim=0)


def _counted_in_backward(config: SamplingConfig, product: str) -> bool:
    """Whether a backward product's MACs are only known in backward: Bernoulli-sampled
    backward products keep a random number of pairs. Every other product's count is
    known at forward time and recorded there (no side effects inside backward, so
    ``torch.compile`` traces the op without breaking the graph)."""
    ratio = config.bwd_ratio if product == "input_grad" else config.wu_ratio
    return config.policy == "bernoulli" and ratio < 1.0


def _count_backward_at_forward(compute: LayerCompute, config: SamplingConfig, input_grad: bool, weight_grad: bool,
                               exact: int, input_grad_macs: int, weight_grad_macs: int) -> None:
    if not torch.is_grad_enabled():
        return
    if input_grad and not _counted_in_backward(config, "input_grad"):
        compute.add("input_grad", exact, input_grad_macs)
    if weight_grad and not _counted_in_backward(config, "weight_grad"):
        compute.add("weight_grad", exact, weight_grad_macs)


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on, so the sampled products run in it."""
    first = tensors[0]
    assert first is not None
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _linear_input_grad(grad_out: Tensor, w_k: Tensor, config: SamplingConfig,
                       generator: torch.Generator | None) -> tuple[Tensor, Tensor, int]:
    """Operands of ``dY W_k`` ((M, out) @ (out, k)), optionally sampled over ``out``, and the pairs used."""
    out_features = grad_out.shape[1]
    k_b = config.bwd_k(out_features)
    if k_b >= out_features:
        return grad_out, w_k, out_features
    with torch.no_grad():
        scores = column_norms(grad_out) * _norm(w_k, 1)
    sel = select(scores, k_b, config, generator)
    g = _take_last(grad_out, sel.keep)
    if sel.scale is not None:
        g = g * sel.scale.to(g.dtype)
    return g, w_k.index_select(0, sel.keep), sel.keep.numel()


def _linear_weight_grad(grad_out: Tensor, x_k: Tensor, config: SamplingConfig,
                        generator: torch.Generator | None) -> tuple[Tensor, Tensor, int]:
    """Operands of ``dY^T X_k`` ((out, M) @ (M, k)), optionally sampled over the ``M`` rows, and the rows used."""
    rows = grad_out.shape[0]
    k_w = config.wu_k(rows)
    if k_w >= rows:
        return grad_out.t(), x_k, rows
    with torch.no_grad():
        scores = _norm(grad_out, 1) * _norm(x_k, 1)
    sel = select(scores, k_w, config, generator)
    g = grad_out.index_select(0, sel.keep)
    if sel.scale is not None:
        g = g * sel.scale.to(g.dtype).unsqueeze(1)
    return g.t(), x_k.index_select(0, sel.keep), sel.keep.numel()


class LinearCRS(torch.autograd.Function):
    """Linear product over the selected input features.

    Inputs: ``input (M, n)``, ``weight (out, n)``, ``bias (out,)`` or None, a
    :class:`Selection` of ``k`` features, the layer's config, generator and compute
    record (plain objects), and ``save_input``: keep the full input for backward (when
    autograd keeps it anyway, see :func:`kept_by_producer`) instead of its sampled
    slice. Output: ``(M, out)``.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, selection: Selection,
                config: SamplingConfig, generator: torch.Generator | None, compute: LayerCompute | None,
                save_input: bool = False) -> Tensor:
        with _range(GATHER_RANGE):
            x_k = _take_last(input, selection.keep)
            w_k = _weight_columns(weight, selection)
        output = F.linear(x_k, w_k, bias)
        # The weight itself, not its sampled copy, is kept for backward: it is held
        # anyway, so the layer's saved memory is the input slice alone (or nothing new).
        ctx.save_for_backward(input if save_input else x_k, weight)
        ctx.save_input = save_input
        ctx.selection, ctx.config, ctx.generator, ctx.compute = selection, config, generator, compute
        ctx.input_shape, ctx.weight_shape = input.shape, weight.shape
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x_k, weight = ctx.saved_tensors
        selection: Selection = ctx.selection
        if ctx.save_input:
            with _range(GATHER_RANGE):
                x_k = _take_last(x_k, selection.keep)
        config: SamplingConfig = ctx.config
        compute: LayerCompute | None = ctx.compute
        rows, n = ctx.input_shape
        out_features = ctx.weight_shape[0]
        k = selection.keep.numel()
        grad_input = grad_weight = grad_bias = None
        grad_output = grad_output.contiguous()
        if ctx.needs_input_grad[0]:
            with _range(GATHER_RANGE):
                w_k = _weight_columns(weight, selection)
            a, b, k_b = _linear_input_grad(grad_output, w_k, config, ctx.generator)
            grad_input = _matmul_into_columns(a, b, n, selection)
            if compute is not None and _counted_in_backward(config, "input_grad"):
                compute.add("input_grad", rows * out_features * n, rows * k_b * k)
        if ctx.needs_input_grad[1]:
            a, b, k_w = _linear_weight_grad(grad_output, x_k, config, ctx.generator)
            if selection.scale is not None:  # on the (rows, k) operand: cheaper than on the (out, k) product
                b = b * selection.scale.to(b.dtype)
            if is_column_major(weight):  # the gradient in the parameter's layout: rows of dW^T = b^T a^T
                grad_weight = _matmul_into_rows(b.t(), a.t(), n, selection).t()
            else:
                grad_weight = _matmul_into_columns(a, b, n, selection)
            if compute is not None and _counted_in_backward(config, "weight_grad"):
                compute.add("weight_grad", rows * out_features * n, k_w * out_features * k)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def approx_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    config: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    compute: LayerCompute | None = None,
) -> Tensor:
    """Column-row sampled ``F.linear``.

    Pairs are the ``n`` input features; a feature's score is the norm of its input
    column over all leading dimensions times the norm of the matching weight column.

    Shapes: ``input (*, n)``, ``weight (out, n)``, ``bias (out,)``; returns ``(*, out)``.
    At ``k = n`` (or policy ``exact``) this is ``F.linear`` itself.
    """
    n = weight.shape[1]
    k = config.k(n)
    x2 = input.reshape(-1, n)
    rows, out_features = x2.shape[0], weight.shape[0]
    if k >= n and config.policy != "bernoulli" and not config.samples_backward or config.policy == "exact":
        if compute is not None:
            _count_exact(compute, linear_macs(rows, n, out_features), input.requires_grad, weight.requires_grad)
        return F.linear(input, weight, bias)
    save_input = kept_by_producer(input)
    x2, weight, bias = _autocast(x2, weight, bias)
    save_input = save_input and x2.data_ptr() == input.data_ptr() and x2.dtype == input.dtype
    with torch.no_grad(), _range(SELECT_RANGE):
        scores = column_norms(x2) * column_norms(weight)
        selection = select(scores, k, config, generator)
    if compute is not None:
        kept, full = selection.keep.numel(), rows * n * out_features
        compute.count_call()
        compute.add("forward", full, rows * kept * out_features)
        _count_backward_at_forward(compute, config, x2.requires_grad, weight.requires_grad, full,
                                   rows * config.bwd_k(out_features) * kept, config.wu_k(rows) * out_features * kept)
    output = LinearCRS.apply(x2, weight, bias, selection, config, generator, compute, save_input)
    return output.reshape(*input.shape[:-1], out_features)


def _count_exact(compute: LayerCompute, macs: int, input_grad: bool, weight_grad: bool) -> None:
    """Record one exact call: each of its products costs ``macs``."""
    compute.count_call()
    compute.add("forward", macs, macs)
    if torch.is_grad_enabled():
        if input_grad:
            compute.add("input_grad", macs, macs)
        if weight_grad:
            compute.add("weight_grad", macs, macs)


def _conv_input_grad(grad_out: Tensor, x_k: Tensor, w_k: Tensor, geometry: tuple, config: SamplingConfig,
                     generator: torch.Generator | None) -> tuple[Tensor, int]:
    """Gradient w.r.t. the sampled input (transposed conv), optionally sampled over output channels."""
    stride, padding, dilation = geometry
    out_channels = grad_out.shape[1]
    k_b = config.bwd_k(out_channels)
    if k_b < out_channels:
        with torch.no_grad():
            scores = channel_norms(grad_out) * _norm(w_k, (1, 2, 3))
        sel = select(scores, k_b, config, generator)
        grad_out = _take_channels(grad_out, sel.keep)
        if sel.scale is not None:
            grad_out = grad_out * _scale_view(sel.scale.to(grad_out.dtype), 1, 4)
        w_k = w_k.index_select(0, sel.keep)
        k_b = sel.keep.numel()
    g, _, _ = _convolution_backward(grad_out, x_k, w_k, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False])
    return g, k_b


def _conv_weight_grad(grad_out: Tensor, x_k: Tensor, w_k: Tensor, geometry: tuple, config: SamplingConfig,
                      generator: torch.Generator | None) -> tuple[Tensor, int]:
    """Gradient w.r.t. the sampled kernel, optionally sampled over batch samples."""
    stride, padding, dilation = geometry
    batch = grad_out.shape[0]
    k_w = config.wu_k(batch)
    if k_w < batch:
        with torch.no_grad():
            scores = _norm(grad_out, (1, 2, 3)) * _norm(x_k, (1, 2, 3))
        sel = select(scores, k_w, config, generator)
        grad_out = grad_out.index_select(0, sel.keep)
        if sel.scale is not None:
            grad_out = grad_out * _scale_view(sel.scale.to(grad_out.dtype), 0, 4)
        x_k = x_k.index_select(0, sel.keep)
        k_w = sel.keep.numel()
    _, g, _ = _convolution_backward(grad_out, x_k, w_k, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False])
    return g, k_w


class Conv2dCRS(torch.autograd.Function):
    """Convolution over the selected input channels (groups = 1).

    Inputs: ``input (N, C, H, W)``, ``weight (O, C, kh, kw)``, ``bias (O,)`` or None,
    a :class:`Selection` of ``k`` channels, ``geometry = (stride, padding, dilation)``
    as int pairs, the layer's config, generator and compute record, and ``save_input``
    (as for :class:`LinearCRS`). Output: ``(N, O, H_out, W_out)``.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, selection: Selection, geometry: tuple,
                config: SamplingConfig, generator: torch.Generator | None, compute: LayerCompute | None,
                save_input: bool = False) -> Tensor:
        with _range(GATHER_RANGE):
            x_k = _take_channels(input, selection.keep)
            w_k = weight.index_select(1, selection.keep)
            if selection.scale is not None:
                w_k = w_k * _scale_view(selection.scale.to(w_k.dtype), 1, 4)
        stride, padding, dilation = geometry
        output = F.conv2d(x_k, w_k, bias, stride, padding, dilation)
        ctx.save_for_backward(input if save_input else x_k, weight)  # the weight itself (held anyway), not its sampled copy
        ctx.save_input = save_input
        ctx.selection, ctx.geometry, ctx.config, ctx.generator, ctx.compute = selection, geometry, config, generator, compute
        ctx.input_shape, ctx.weight_shape = input.shape, weight.shape
        ctx.input_channels_last = input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x_k, weight = ctx.saved_tensors
        selection: Selection = ctx.selection
        config: SamplingConfig = ctx.config
        compute: LayerCompute | None = ctx.compute
        with _range(GATHER_RANGE):
            if ctx.save_input:
                x_k = _take_channels(x_k, selection.keep)
            w_k = weight.index_select(1, selection.keep)
            if selection.scale is not None:
                w_k = w_k * _scale_view(selection.scale.to(w_k.dtype), 1, 4)
        batch, channels = ctx.input_shape[:2]
        out_channels, _, kh, kw = ctx.weight_shape
        k = selection.keep.numel()
        per_pair = grad_output.shape[2] * grad_output.shape[3] * kh * kw  # MACs per (sample, in, out) triple
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            g, k_b = _conv_input_grad(grad_output, x_k, w_k, ctx.geometry, config, ctx.generator)
            memory_format = torch.channels_last if ctx.input_channels_last else torch.contiguous_format
            with _range(SCATTER_RANGE):
                grad_input = _scatter_columns(ctx.input_shape, 1, selection, g, memory_format)
            if compute is not None and _counted_in_backward(config, "input_grad"):
                compute.add("input_grad", batch * channels * out_channels * per_pair, batch * k * k_b * per_pair)
        if ctx.needs_input_grad[1]:
            g, k_w = _conv_weight_grad(grad_output, x_k, w_k, ctx.geometry, config, ctx.generator)
            if selection.scale is not None:
                g = g * _scale_view(selection.scale.to(g.dtype), 1, 4)
            with _range(SCATTER_RANGE):
                grad_weight = _scatter_columns(ctx.weight_shape, 1, selection, g)
            if compute is not None and _counted_in_backward(config, "weight_grad"):
                compute.add("weight_grad", batch * channels * out_channels * per_pair, k_w * k * out_channels * per_pair)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


def approx_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    config: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    compute: LayerCompute | None = None,
) -> Tensor:
    """Column-row sampled ``F.conv2d`` (groups = 1, numeric zero padding).

    Pairs are the ``C`` input channels, scored ``|I^[c]|_F * |K_[c]|_F`` (Eq. 8).

    Shapes: ``input (N, C, H, W)``, ``weight (O, C, kh, kw)``, ``bias (O,)``;
    returns ``(N, O, H_out, W_out)``. At ``k = C`` (or policy ``exact``) this is
    ``F.conv2d`` itself.
    """
    if input.dim() != 4:
        raise ValueError(f"approx_conv2d input has shape {tuple(input.shape)}; allowed: (N, C, H, W)")
    geometry = (_pair(stride), _pair(padding), _pair(dilation))
    channels = weight.shape[1]
    k = config.k(channels)
    if k >= channels and config.policy != "bernoulli" and not config.samples_backward or config.policy == "exact":
        output = F.conv2d(input, weight, bias, *geometry)
        if compute is not None:
            macs = conv2d_macs(output.shape[0], channels, output.shape[1], weight.shape[2:], output.shape[2:])
            _count_exact(compute, macs, input.requires_grad, weight.requires_grad)
        return output
    original = input
    input, weight, bias = _autocast(input, weight, bias)
    save_input = input is original and kept_by_producer(input)
    with torch.no_grad(), _range(SELECT_RANGE):
        scores = channel_norms(input) * channel_norms(weight)
        selection = select(scores, k, config, generator)
    output = Conv2dCRS.apply(input, weight, bias, selection, geometry, config, generator, compute, save_input)
    if compute is not None:
        batch, out_channels = output.shape[0], output.shape[1]
        per_pair = output.shape[2] * output.shape[3] * weight.shape[2] * weight.shape[3]
        kept, full = selection.keep.numel(), batch * out_channels * channels * per_pair
        compute.count_call()
        compute.add("forward", full, batch * out_channels * kept * per_pair)
        _count_backward_at_forward(compute, config, input.requires_grad, weight.requires_grad, full,
                                   batch * config.bwd_k(out_channels) * kept * per_pair,
                                   config.wu_k(batch) * out_channels * kept * per_pair)
    return output
