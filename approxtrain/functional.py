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
``mode=backward`` keeps every pair forward and samples both backward products at
``ratio`` (the thesis's backward-only sampling); at ``k = n`` the forward product is
exact for every policy, so only the backward products are sampled.

How slices are taken and spread in memory is :mod:`approxtrain._layout`'s business;
the MACs each call runs are counted by :class:`~approxtrain.accounting.LayerShape`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from approxtrain import kernels
from approxtrain._layout import is_channels_last, is_column_major, matmul_into, norms, spread, take
from approxtrain.accounting import LayerCompute, LayerShape, record_backward_product, record_call
from approxtrain.profiling import GATHER_RANGE, SELECT_RANGE, profiler_range
from approxtrain.sampling import SamplingConfig, Selection, select

_convolution_backward = torch.ops.aten.convolution_backward.default


def _scaled(t: Tensor, dim: int, scale: Tensor | None) -> Tensor:
    """``t`` with its slices along ``dim`` multiplied by ``scale`` (none: ``t`` itself)."""
    if scale is None:
        return t
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * scale.to(t.dtype).view(shape)


def _sampled_weight(weight: Tensor, selection: Selection) -> Tensor:
    """``W[:, S] D``: the weight's kept columns (a kernel's kept input channels), scaled. A
    kernel's are taken by ``index_select``, contiguous in any layout, as the convolution's
    backward and the backward pair norms have always rounded them."""
    taken = take(weight, 1, selection.keep) if weight.dim() == 2 else weight.index_select(1, selection.keep)
    return _scaled(taken, 1, selection.scale)


@dataclass(eq=False)
class PairScoring:
    """How a layer scores the pairs its forward selects, and what it kept: the seam through which
    data-parallel training (:mod:`approxtrain.run.distributed`) shares the selection across processes.

    ``reduce_input``: maps this process's input slice norms to the ones scored (e.g. the global
    batch's, all-reduced); ``weights_only``: score by the weight's slice norms alone; ``kept``:
    when a list, each forward selection's ``keep`` is appended (its reader clears it).
    """

    reduce_input: Callable[[Tensor], Tensor] | None = None
    weights_only: bool = False
    kept: list[Tensor] | None = field(default=None, repr=False)


@dataclass(eq=False)
class KeptPairs:
    """A layer's last forward selection, reused while ``config.reselect_every`` allows.

    ``selection``: what the forward kept, for ``k`` pairs out of ``n``; ``uses``: the calls
    that have run on it. A new ``k`` or ``n`` (a schedule's step, another input) selects afresh.
    Not part of a checkpoint: the first step after a resume selects afresh.
    """

    selection: Selection | None = None
    k: int = 0
    n: int = 0
    uses: int = 0

    def reusable(self, k: int, n: int, every: int) -> Selection | None:
        """The kept selection if it may serve one more call (counted), else None."""
        if self.selection is None or self.k != k or self.n != n or self.uses >= every:
            return None
        self.uses += 1
        return self.selection

    def remember(self, selection: Selection, k: int, n: int) -> None:
        self.selection, self.k, self.n, self.uses = selection, k, n, 1


def _select_pairs(a: Tensor, a_dim: int, b: Tensor, b_dim: int, k: int, config: SamplingConfig,
                  generator: torch.Generator | None, scoring: PairScoring | None = None,
                  reuse: KeptPairs | None = None) -> Selection:
    """``k`` of the pairs (slice ``i`` of ``a`` along ``a_dim``, of ``b`` along ``b_dim``), scored
    ``|a_i| |b_i|`` (or as ``scoring`` says; not at all for a policy that does not read scores, whose
    ``scores`` are then ``n`` unset values); ``reuse``: the layer's kept selection, reused for
    ``config.reselect_every`` calls (not scored again on those)."""
    n = b.shape[b_dim]
    selection = None
    if reuse is not None and config.reselect_every > 1:
        selection = reuse.reusable(k, n, config.reselect_every)
    if selection is None:
        with torch.no_grad():
            scores = pair_scores(a, a_dim, b, b_dim, scoring) if config.sampler.needs_scores else b.new_empty(n)
            selection = select(scores, k, config, generator)
        if reuse is not None and config.reselect_every > 1:
            reuse.remember(selection, k, n)
    if scoring is not None and scoring.kept is not None:
        scoring.kept.append(selection.keep)
    return selection


def pair_scores(a: Tensor, a_dim: int, b: Tensor, b_dim: int, scoring: PairScoring | None = None) -> Tensor:
    """The scores ``|a_i| |b_i|`` a forward selects by (or as ``scoring`` says: the weight's norms
    alone, or the input norms reduced over the processes), ``(n,)``."""
    with torch.no_grad():
        if scoring is not None and scoring.weights_only:
            return norms(b, b_dim)
        a_norms = norms(a, a_dim)
        if scoring is not None and scoring.reduce_input is not None:
            a_norms = scoring.reduce_input(a_norms)
        return a_norms * norms(b, b_dim)


def _sample_pairs(a: Tensor, a_dim: int, b: Tensor, b_dim: int, k: int, config: SamplingConfig,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor, int]:
    """The operands of a backward product over its pairs (``a``'s slices along ``a_dim``,
    ``b``'s along ``b_dim``), sampled down to ``k`` (scale on ``a``), and the pairs kept."""
    n = a.shape[a_dim]
    if k >= n:
        return a, b, n
    selection = _select_pairs(a, a_dim, b, b_dim, k, config, generator)
    return (_scaled(take(a, a_dim, selection.keep), a_dim, selection.scale), take(b, b_dim, selection.keep),
            selection.keep.numel())


def _is_exact(config: SamplingConfig, k: int, n: int) -> bool:
    """Whether the op is the exact one: every pair kept forward (an exact product for every
    policy, see :func:`~approxtrain.sampling.select`) and nothing sampled backward."""
    return k >= n and not config.samples_backward or config.is_exact


def _autocast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on, so the sampled products run in it."""
    first = tensors[0]
    assert first is not None
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


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


def _save(ctx: Any, input: Tensor, x_k: Tensor, weight: Tensor, keep: Tensor, scale: Tensor | None, unique: bool,
          save_input: bool, config: SamplingConfig, generator: torch.Generator | None, compute: LayerCompute | None) -> None:
    """What both ops keep for backward: the sampled input slice (or, with ``save_input``, the
    input itself), the weight itself (held anyway, not its sampled copy) and the selection."""
    ctx.save_for_backward(input if save_input else x_k, weight, keep, scale)
    ctx.unique, ctx.save_input, ctx.config, ctx.generator, ctx.compute = unique, save_input, config, generator, compute


def _saved(ctx: Any) -> tuple[Tensor, Tensor, Selection]:
    """The sampled input slice, the weight and the selection kept by :func:`_save`."""
    x_k, weight, keep, scale = ctx.saved_tensors
    if ctx.save_input:
        with profiler_range(GATHER_RANGE):
            x_k = take(x_k, 1, keep)
    return x_k, weight, Selection(keep, scale, ctx.unique)


class LinearCRS(torch.autograd.Function):
    """Linear product over the selected input features.

    Inputs: ``input (M, n)``, ``weight (out, n)``, ``bias (out,)`` or None, the
    selection's ``keep (k,)`` and ``scale (k,)`` or None and whether ``keep`` is
    ``unique``; ``save_input``: keep the full input for backward (when autograd keeps it
    anyway, see :func:`kept_by_producer`) instead of its sampled slice ``(M, k)``; the
    layer's config, generator and compute record. Output: ``(M, out)``.

    ``forward`` takes ``ctx`` itself (no ``setup_context``): ``Function.apply`` then binds no
    signature, which costs ~40 us of host time per call (``scripts/bench_host.py``).
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor, scale: Tensor | None,
                unique: bool, save_input: bool, config: SamplingConfig, generator: torch.Generator | None,
                compute: LayerCompute | None) -> Tensor:
        with profiler_range(GATHER_RANGE):
            x_k = take(input, 1, keep)
            _save(ctx, input, x_k, weight, keep, scale, unique, save_input, config, generator, compute)
            if _fused_linear(x_k, weight, unique, config):  # Y = X[:, S] (W[:, S] D)^T, W read at S in the product
                output = kernels.gather_mm(x_k, weight.t(), keep, scale, 1, False, True, x_k.shape[0], weight.shape[0])
                return output if bias is None else output.add_(bias)
            w_k = _sampled_weight(weight, Selection(keep, scale, unique))
        return F.linear(x_k, w_k, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x_k, weight, selection = _saved(ctx)
        config, generator = ctx.config, ctx.generator
        (out_features, n), k = weight.shape, selection.keep.numel()
        shape = LayerShape.linear(grad_output.shape[0], n, out_features)
        grad_output = grad_output.contiguous()
        grad_input = grad_weight = grad_bias = None
        if _fused_linear(grad_output, weight, selection.unique, config) and grad_output.dtype == x_k.dtype:
            grad_input, grad_weight = _fused_linear_backward(ctx, grad_output, x_k, weight, selection)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum(0)
            return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None
        if ctx.needs_input_grad[0]:  # dX[:, S] = dY W[:, S] D, optionally sampled over the outputs
            with profiler_range(GATHER_RANGE):
                w_k = _sampled_weight(weight, selection)
            dy, w_b, k_b = _sample_pairs(grad_output, 1, w_k, 0, config.bwd_k(out_features), config, generator)
            grad_input = matmul_into(dy, w_b, 1, n, selection)
            record_backward_product(ctx.compute, shape, config, "input_grad", k, k_b)
        if ctx.needs_input_grad[1]:  # dW[:, S] = dY^T X[:, S] D, optionally sampled over the rows
            dy, x_w, k_w = _sample_pairs(grad_output, 0, x_k, 0, config.wu_k(shape.batch), config, generator)
            # D on the (rows, k) operand: cheaper than on the (out, k) product; dW in W's layout
            grad_weight = matmul_into(dy.t(), _scaled(x_w, 1, selection.scale), 1, n, selection,
                                      column_major=is_column_major(weight))
            record_backward_product(ctx.compute, shape, config, "weight_grad", k, k_w)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _fused_linear(operand: Tensor, weight: Tensor, unique: bool, config: SamplingConfig) -> bool:
    """Whether the linear's products run as gather-GEMM kernels (:func:`approxtrain.kernels.gather_mm`):
    the Triton backend on this device, distinct pairs, no extra backward sampling, one dtype."""
    return (kernels.enabled(operand, "linear") and unique and not config.samples_backward and operand.dtype == weight.dtype
            and operand.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _fused_linear_backward(ctx: Any, grad_output: Tensor, x_k: Tensor, weight: Tensor,
                           selection: Selection) -> tuple[Tensor | None, Tensor | None]:
    """``dX`` and ``dW`` at full size, the kept columns written by the products themselves (no
    gather of ``W[:, S]``, no scatter): ``dX[:, S] = dY W[:, S] D``, ``dW[:, S] = (dY^T X[:, S]) D``."""
    (out_features, n), k = weight.shape, selection.keep.numel()
    rows = grad_output.shape[0]
    shape = LayerShape.linear(rows, n, out_features)
    keep, scale = selection.keep, selection.scale
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = kernels.gather_mm(grad_output, weight, keep, scale, 2, False, True, rows, n)
        record_backward_product(ctx.compute, shape, ctx.config, "input_grad", k, out_features)
    if ctx.needs_input_grad[1]:
        if is_column_major(weight):  # dW^T (n, out) row-major: its kept rows
            grad_weight = kernels.gather_mm(x_k.t(), grad_output, keep, scale, 0, False, False, n, out_features).t()
        else:  # dW (out, n) row-major: its kept columns
            grad_weight = kernels.gather_mm(grad_output.t(), x_k, keep, scale, 2, False, False, out_features, n)
        record_backward_product(ctx.compute, shape, ctx.config, "weight_grad", k, rows)
    return grad_input, grad_weight


def approx_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    config: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    compute: LayerCompute | None = None,
    scoring: PairScoring | None = None,
    reuse: KeptPairs | None = None,
) -> Tensor:
    """Column-row sampled ``F.linear``.

    Pairs are the ``n`` input features; a feature's score is the norm of its input
    column over all leading dimensions times the norm of the matching weight column.

    Shapes: ``input (*, n)``, ``weight (out, n)``, ``bias (out,)``; returns ``(*, out)``.
    At ``k = n`` (or policy ``exact``) this is ``F.linear`` itself. ``scoring``: see :class:`PairScoring`;
    ``reuse``: the layer's :class:`KeptPairs` (``config.reselect_every``).

    Examples::

        >>> x, weight = torch.randn(8, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
        >>> y = approx_linear(x, weight, config=SamplingConfig("topk", ratio=0.5))  # 8 of the 16 features
        >>> y.shape
        torch.Size([8, 4])
        >>> y.sum().backward()
        >>> int((x.grad.abs().sum(0) > 0).sum())  # the input gradient is zero outside the kept features
        8
        >>> torch.allclose(approx_linear(x, weight, config=SamplingConfig("topk", ratio=1.0)), x @ weight.T)
        True
    """
    out_features, n = weight.shape
    k = config.k(n)
    x2 = input.reshape(-1, n)
    shape = LayerShape.linear(x2.shape[0], n, out_features)
    if _is_exact(config, k, n):
        if compute is not None:
            record_call(compute, shape, input.requires_grad, weight.requires_grad)
        return F.linear(input, weight, bias)
    save_input = kept_by_producer(input)
    x2, weight, bias = _autocast(x2, weight, bias)
    save_input = save_input and x2.data_ptr() == input.data_ptr() and x2.dtype == input.dtype
    with profiler_range(SELECT_RANGE):
        selection = _select_pairs(x2, 1, weight, 1, k, config, generator, scoring, reuse)
    if compute is not None:
        record_call(compute, shape, x2.requires_grad, weight.requires_grad, config, selection.keep.numel())
    output = LinearCRS.apply(x2, weight, bias, *selection, save_input, config, generator, compute)
    return output.reshape(*input.shape[:-1], out_features)


def _conv_shape(output: Tensor, weight: Tensor) -> LayerShape:
    """The MAC model's sizes of a convolution with this ``output`` (or output gradient)."""
    return LayerShape.conv2d(output.shape[0], weight.shape[1], weight.shape[0], weight.shape[2:], output.shape[2:])


class Conv2dCRS(torch.autograd.Function):
    """Convolution over the selected input channels (groups = 1).

    Inputs: ``input (N, C, H, W)``, ``weight (O, C, kh, kw)``, ``bias (O,)`` or None,
    then as :class:`LinearCRS` (``k`` channels), and ``geometry = (stride, padding,
    dilation)`` as int pairs. Output: ``(N, O, H_out, W_out)``; the sampled input ``(N, k, H, W)``
    is kept for backward.
    """

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor, scale: Tensor | None,
                unique: bool, save_input: bool, config: SamplingConfig, generator: torch.Generator | None,
                compute: LayerCompute | None, geometry: tuple) -> Tensor:
        with profiler_range(GATHER_RANGE):
            x_k = take(input, 1, keep)
            w_k = _sampled_weight(weight, Selection(keep, scale, unique))
        _save(ctx, input, x_k, weight, keep, scale, unique, save_input, config, generator, compute)
        ctx.geometry, ctx.channels_last = geometry, is_channels_last(input)
        return F.conv2d(x_k, w_k, bias, *geometry)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x_k, weight, selection = _saved(ctx)
        with profiler_range(GATHER_RANGE):
            w_k = _sampled_weight(weight, selection)
        channels, k = weight.shape[1], selection.keep.numel()
        shape = _conv_shape(grad_output, weight)
        g_input, g_weight, grad_bias, k_b, k_w = _conv_backward_products(ctx, grad_output, x_k, w_k, shape)
        grad_input = grad_weight = None
        if g_input is not None:
            grad_input = spread(g_input, 1, channels, selection, ctx.channels_last)
            record_backward_product(ctx.compute, shape, ctx.config, "input_grad", k, k_b)
        if g_weight is not None:  # in the weight's own layout: autograd would copy it there otherwise
            grad_weight = spread(_scaled(g_weight, 1, selection.scale), 1, channels, selection, is_channels_last(weight))
            record_backward_product(ctx.compute, shape, ctx.config, "weight_grad", k, k_w)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _conv_backward_products(ctx: Any, grad_output: Tensor, x_k: Tensor, w_k: Tensor, shape: LayerShape
                            ) -> tuple[Tensor | None, Tensor | None, Tensor | None, int, int]:
    """The convolution's backward products over the kept channels, each None where not needed: the
    transposed convolution ``(N, k, H, W)``, optionally sampled over the output channels (``k_b`` of
    them kept), the kernel gradient ``(O, k, kh, kw)``, optionally over the batch (``k_w``), and the
    bias gradient (exact). Without backward sampling all three read the same operands and come from one call."""
    config, generator = ctx.config, ctx.generator
    geometry = (*ctx.geometry, False, [0, 0], 1)
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not config.samples_backward:
        grads = _convolution_backward(grad_output, x_k, w_k, [shape.out] if need_bias else None, *geometry,
                                      [need_input, need_weight, need_bias])
        return *grads, shape.out, shape.batch
    g_input = g_weight = None
    k_b = k_w = 0
    if need_input:
        dy, w_b, k_b = _sample_pairs(grad_output, 1, w_k, 0, config.bwd_k(shape.out), config, generator)
        g_input = _convolution_backward(dy, x_k, w_b, None, *geometry, [True, False, False])[0]
    if need_weight:
        dy, x_w, k_w = _sample_pairs(grad_output, 0, x_k, 0, config.wu_k(shape.batch), config, generator)
        g_weight = _convolution_backward(dy, x_w, w_k, None, *geometry, [False, True, False])[1]
    return g_input, g_weight, grad_output.sum((0, 2, 3)) if need_bias else None, k_b, k_w


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
    scoring: PairScoring | None = None,
    reuse: KeptPairs | None = None,
) -> Tensor:
    """Column-row sampled ``F.conv2d`` (groups = 1, numeric zero padding).

    Pairs are the ``C`` input channels, scored ``|I^[c]|_F * |K_[c]|_F`` (Eq. 8).

    Shapes: ``input (N, C, H, W)``, ``weight (O, C, kh, kw)``, ``bias (O,)``;
    returns ``(N, O, H_out, W_out)``. At ``k = C`` (or policy ``exact``) this is
    ``F.conv2d`` itself. ``scoring``: see :class:`PairScoring`; ``reuse``: see :func:`approx_linear`.

    Examples::

        >>> images, kernel = torch.randn(2, 8, 5, 5), torch.randn(3, 8, 3, 3)
        >>> approx_conv2d(images, kernel, padding=1, config=SamplingConfig("topk", ratio=0.25)).shape  # 2 of 8 channels
        torch.Size([2, 3, 5, 5])
    """
    if input.dim() != 4:
        raise ValueError(f"approx_conv2d input has shape {tuple(input.shape)}; allowed: (N, C, H, W)")
    geometry = (_pair(stride), _pair(padding), _pair(dilation))
    channels = weight.shape[1]
    k = config.k(channels)
    if _is_exact(config, k, channels):
        output = F.conv2d(input, weight, bias, *geometry)
        if compute is not None:
            record_call(compute, _conv_shape(output, weight), input.requires_grad, weight.requires_grad)
        return output
    original = input
    input, weight, bias = _autocast(input, weight, bias)
    save_input = input is original and kept_by_producer(input)
    with profiler_range(SELECT_RANGE):
        selection = _select_pairs(input, 1, weight, 1, k, config, generator, scoring, reuse)
    output = Conv2dCRS.apply(input, weight, bias, *selection, save_input, config, generator, compute, geometry)
    if compute is not None:
        record_call(compute, _conv_shape(output, weight), input.requires_grad, weight.requires_grad, config,
                    selection.keep.numel())
    return output
