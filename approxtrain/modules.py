"""Approximate layers: drop-in ``nn.Linear`` / ``nn.Conv2d`` with column-row sampling.

They subclass the exact modules, so parameters, ``state_dict`` keys and
``isinstance`` checks are unchanged (a checkpoint loads into either). They sample
in training mode only; in eval mode they are the exact layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from approxtrain.accounting import LayerCompute
from approxtrain.functional import KeptPairs, PairScoring, approx_conv2d, approx_linear
from approxtrain.sampling import SamplingConfig


def _describe(sampling: SamplingConfig, n: int) -> str:
    chosen = "fixed_k" if sampling.fixed_k is not None else f"ratio={sampling.ratio:g}"
    text = f"sampler={sampling.policy}, {chosen}, k={sampling.k(n)}/{n}"
    for switch in sampling.sampler.switches:  # the switches its policy reads
        text += f", {switch}={getattr(sampling, switch)}"
    if sampling.bwd_ratio < 1:
        text += f", bwd_ratio={sampling.bwd_ratio:g}"
    if sampling.wu_ratio < 1:
        text += f", wu_ratio={sampling.wu_ratio:g}"
    if sampling.mode == "backward":
        text += ", mode=backward (forward exact, ratio samples the gradient products)"
    if sampling.k_rounding != "nearest":
        text += f", k_rounding={sampling.k_rounding}"
    if sampling.reselect_every > 1:
        text += f", reselect_every={sampling.reselect_every}"
    return text


def _store_column_major_(weight: nn.Parameter) -> None:
    """Re-store a 2-D weight column-major in place: same Parameter, shape and values, strides
    ``(1, out)``. The input features sampling keeps are then contiguous rows of ``W^T``:
    their norms, the sampled weight and the weight gradient move whole rows, not scattered
    elements (on CPU about 2x less time for those pieces of a 4096x4096 layer)."""
    if weight.dim() == 2 and weight.shape[0] > 1 and weight.is_contiguous():
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()


def _parametrized_class(cls: type, module: nn.Module) -> type:
    """``cls``, or for a module under ``torch.nn.utils.parametrize`` (``weight_norm``,
    ``spectral_norm``, ...) the same kind of subclass of ``cls`` torch makes for it: its computed
    tensors as properties (the layer then samples the computed weight), ``remove_parametrizations``
    giving back a plain ``cls``."""
    if not parametrize.is_parametrized(module):
        return cls
    injected = {key: value for key, value in vars(type(module)).items()
                if not key.startswith("__") or key in ("__getstate__", "__deepcopy__")}
    return type(f"Parametrized{cls.__name__}", (cls,), injected)


def weight_requires_grad(module: nn.Module) -> bool:
    """Whether a layer's weight learns -- read from the Parameters a parametrized weight is
    computed from, without computing it (``spectral_norm`` would run a power iteration)."""
    if parametrize.is_parametrized(module, "weight"):
        return any(parameter.requires_grad for parameter in module.parametrizations.weight.parameters())
    return module.weight.requires_grad


def _rebind(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``module``'s state: same Parameter objects, hooks and mode (and
    parametrizations: a parametrized module gives a parametrized ``cls``)."""
    cls = _parametrized_class(cls, module)
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


class SampledLayer:
    """What every approximate layer offers the rest of the package, whatever layer it adapts:
    the product's kind, its weight as that product multiplies it, and where the weight's
    gradient lands. ``sampling``, ``generator``, ``compute``, ``scoring`` and ``kept_pairs`` are
    its sampling state (see :class:`ApproxLinear`)."""

    kind = "Linear"  # the product it computes: ``Linear`` (``x W^T``) or ``Conv2d``
    exact_class: type = nn.Linear  # the layer it adapts: what it is again when made exact
    sampling: SamplingConfig
    scoring: PairScoring | None

    def product_weight(self) -> Tensor:
        """The weight as the product multiplies it: ``(out, n)`` or ``(out, n, kh, kw)`` (a parametrized
        layer's computed weight)."""
        return self.weight  # type: ignore[attr-defined]

    @property
    def pairs(self) -> int:
        """``n``, the column-row pairs of its forward product (input features / channels)."""
        return self.in_features  # type: ignore[attr-defined]

    def weight_parameters(self) -> list[nn.Parameter]:
        """The Parameters its weight is (computed from): ``[weight]``, or a parametrization's originals."""
        if parametrize.is_parametrized(self, "weight"):  # type: ignore[arg-type]
            return list(self.parametrizations.weight.parameters())  # type: ignore[attr-defined]
        return [self.weight]  # type: ignore[attr-defined]

    def sliced_gradients(self) -> dict[nn.Parameter, int]:
        """The Parameters whose gradient is zero outside the kept pairs, with the dim the pairs index
        (none for a parametrized weight: the parametrization spreads its gradient over every pair)."""
        if parametrize.is_parametrized(self, "weight"):  # type: ignore[arg-type]
            return {}
        return {self.weight: 1}  # type: ignore[attr-defined]

    def _start_sampling(self, sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        self.sampling, self.generator, self.compute, self.scoring = sampling, generator, None, None
        self.kept_pairs = KeptPairs()


class ApproxLinear(SampledLayer, nn.Linear):
    """``nn.Linear`` whose product samples input features while training.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``.

    Args (beyond ``nn.Linear``'s):
        sampling: the sampling configuration.
        generator: randomness for random policies (on the layer's device).

    ``compute`` (a :class:`LayerCompute` or None) receives the MACs each step ran.

    The weight is stored column-major (``column_major_weight=True``, the default): shape,
    values and ``state_dict`` are unchanged, ``weight.stride() == (1, out_features)``, and
    its gradient comes in the same layout. Code that needs ``weight.view(...)`` should use
    ``weight.reshape(...)`` or pass ``column_major_weight=False``.

    Examples::

        >>> layer = ApproxLinear(16, 4, sampling=SamplingConfig("topk", ratio=0.25))
        >>> layer
        ApproxLinear(in_features=16, out_features=4, bias=True, sampler=topk, ratio=0.25, k=4/16)
        >>> layer(torch.randn(2, 16)).shape  # training mode: 4 of the 16 input features
        torch.Size([2, 4])
        >>> exact = nn.Linear(16, 4)
        >>> approximate = ApproxLinear.from_linear(exact, SamplingConfig("topk", ratio=0.25))
        >>> approximate.weight is exact.weight, approximate.weight.stride()  # shared, column-major
        (True, (1, 4))
        >>> x = torch.randn(2, 16)
        >>> torch.allclose(approximate.eval()(x), exact(x))  # evaluation is exact
        True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, sampling: SamplingConfig = SamplingConfig(),
                 generator: torch.Generator | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 column_major_weight: bool = True) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.sampling = sampling
        self.generator = generator
        self.compute: LayerCompute | None = None
        self.scoring: PairScoring | None = None  # set by data-parallel training
        self.kept_pairs = KeptPairs()  # the selection sampling.reselect_every reuses
        if column_major_weight:
            _store_column_major_(self.weight)

    @classmethod
    def from_linear(cls, module: nn.Linear, sampling: SamplingConfig, generator: torch.Generator | None = None,
                    column_major_weight: bool = True) -> ApproxLinear:
        """An approximate layer sharing ``module``'s parameters (no copy of the Parameter
        objects; the weight's storage is re-laid out column-major unless told not to)."""
        new = _rebind(cls, module)
        new._start_sampling(sampling, generator)  # a parametrized weight is computed: left as it comes
        if column_major_weight and not parametrize.is_parametrized(new, "weight"):
            _store_column_major_(new.weight)
        return new

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return F.linear(input, self.weight, self.bias)
        return approx_linear(input, self.weight, self.bias, self.sampling, self.generator, self.compute, self.scoring,
                             self.kept_pairs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.sampling, self.in_features)}"


class ApproxConv2d(SampledLayer, nn.Conv2d):
    """``nn.Conv2d`` (groups = 1) whose convolution samples input channels while training.

    Shapes: input ``(N, C_in, H, W)``, output ``(N, C_out, H_out, W_out)``.
    String padding and non-zero padding modes pad explicitly before the product.

    Examples::

        >>> conv = ApproxConv2d.from_conv2d(nn.Conv2d(8, 4, 3), SamplingConfig("nps", ratio=0.5, replacement=True))
        >>> conv
        ApproxConv2d(8, 4, kernel_size=(3, 3), stride=(1, 1), sampler=nps, ratio=0.5, k=4/8, replacement=True, scale=True)
        >>> conv(torch.randn(2, 8, 6, 6)).shape
        torch.Size([2, 4, 4, 4])
    """

    kind, exact_class = "Conv2d", nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", sampling: SamplingConfig = SamplingConfig(), generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if groups != 1:
            raise ValueError(f"ApproxConv2d groups={groups} is not supported; allowed: groups=1 (grouped convolutions stay exact)")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.sampling = sampling
        self.generator = generator
        self.compute: LayerCompute | None = None
        self.scoring: PairScoring | None = None  # set by data-parallel training
        self.kept_pairs = KeptPairs()  # the selection sampling.reselect_every reuses

    @classmethod
    def from_conv2d(cls, module: nn.Conv2d, sampling: SamplingConfig, generator: torch.Generator | None = None) -> ApproxConv2d:
        """An approximate layer sharing ``module``'s parameters (no copy)."""
        if module.groups != 1:
            raise ValueError(f"conv groups={module.groups} cannot be sampled; allowed: groups=1 (grouped convolutions stay exact)")
        new = _rebind(cls, module)
        new._start_sampling(sampling, generator)
        return new

    def _padded(self, input: Tensor) -> tuple[Tensor, tuple[int, int] | str]:
        if self.padding_mode != "zeros":
            return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        if isinstance(self.padding, str):
            left_right = self._reversed_padding_repeated_twice
            if any(left_right[i] != left_right[i + 1] for i in (0, 2)):
                return F.pad(input, left_right), (0, 0)
            return input, (left_right[2], left_right[0])
        return input, self.padding

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return self._conv_forward(input, self.weight, self.bias)
        input, padding = self._padded(input)
        return approx_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                             self.sampling, self.generator, self.compute, self.scoring, self.kept_pairs)

    @property
    def pairs(self) -> int:
        return self.in_channels

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.sampling, self.in_channels)}"


class _Conv1DSampling(SampledLayer):
    """The sampling of a Hugging Face ``Conv1D`` (GPT-2 family): ``x @ W + b`` with ``W`` stored
    ``(n, out)`` -- a Linear's product with the weight transposed, so it samples the ``n`` input
    features as :class:`ApproxLinear` does, its Parameters (and ``state_dict``) untouched.
    Mixed into a subclass of the layer's own class by :func:`approx_conv1d`."""

    def product_weight(self) -> Tensor:
        return self.weight.t()  # type: ignore[attr-defined]

    @property
    def pairs(self) -> int:
        return self.nx  # type: ignore[attr-defined]

    def sliced_gradients(self) -> dict[nn.Parameter, int]:
        return {self.weight: 0} if not parametrize.is_parametrized(self, "weight") else {}  # type: ignore

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)  # type: ignore[misc]
        return approx_linear(input, self.product_weight(), self.bias, self.sampling,  # type: ignore[attr-defined]
                             self.generator, self.compute, self.scoring, self.kept_pairs)

    def __repr__(self) -> str:
        return f"Approx{self.exact_class.__name__}(nf={self.nf}, nx={self.nx}, {_describe(self.sampling, self.nx)})"  # type: ignore


_CONV1D_CLASSES: dict[type, type] = {}


def approx_conv1d(module: nn.Module, sampling: SamplingConfig, generator: torch.Generator | None = None) -> nn.Module:
    """A sampled twin of a Hugging Face ``Conv1D`` sharing its Parameters: an instance of a subclass of
    the layer's own class (``isinstance`` checks hold), made once per class."""
    base = type(module)
    if base not in _CONV1D_CLASSES:
        _CONV1D_CLASSES[base] = type(f"Approx{base.__name__}", (_Conv1DSampling, base),
                                     {"exact_class": base, "__module__": __name__})
    new = _rebind(_CONV1D_CLASSES[base], module)
    new._start_sampling(sampling, generator)
    return new
