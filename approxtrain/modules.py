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


class ApproxLinear(nn.Linear):
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
        new.sampling, new.generator, new.compute, new.scoring = sampling, generator, None, None
        new.kept_pairs = KeptPairs()  # a parametrized weight is computed: left as it comes
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


class ApproxConv2d(nn.Conv2d):
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
        new.sampling, new.generator, new.compute, new.scoring = sampling, generator, None, None
        new.kept_pairs = KeptPairs()
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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_describe(self.sampling, self.in_channels)}"
