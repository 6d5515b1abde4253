"""Model surgery: make a model's Linear/Conv2d layers approximate by per-layer rules.

:func:`approximate_` takes any ``nn.Module`` and an ordered list of
:class:`LayerRule`, swaps every matching layer in place for its approximate twin
(sharing the same parameters) and returns a :class:`Plan`: one row per
Linear/Conv2d (and cuDNN LSTM, whose gate products are counted but stay exact)
with its n, k, ratio, policy and MACs, and one row per module whose products it leaves
exact for another reason, saying why (attention's activation products, a weight of
another kind). Each ``nn.MultiheadAttention`` becomes a
:class:`~approxtrain.attention.ProjectedMultiheadAttention` first, so its four projections
are Linear layers like any other. :func:`attach_meter` wires a
:class:`~approxtrain.accounting.ComputeMeter` so training counts what really ran.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from approxtrain.accounting import ComputeMeter, LayerShape, ProductMACs, compute_reduction, lstm_stack_macs, sampled_macs
from approxtrain.adapters import adapter_of
from approxtrain.attention import ProjectedMultiheadAttention, unsupported
from approxtrain.modules import ApproxConv2d, ApproxLinear, SampledLayer, _rebind, weight_requires_grad
from approxtrain.sampling import SamplingConfig

LAYER_TYPES = ("Linear", "Conv2d")
_NO_LAYERS = ("none (the model has no nn.Linear/nn.Conv2d layer nor one surgery adapts: products it computes with "
              "torch.nn.functional or raw Parameters cannot be sampled)")
POSITIONS = ("first", "last")
_RULE_KEYS = ("match", "type", "exact", "position")


@dataclass(frozen=True)
class LayerRule:
    """Which layers get which sampling.

    Args:
        match: glob on the qualified module name (``block2.*.conv1``), or a regular
            expression prefixed with ``re:`` (``re:layer[1-4]\\..*``); None = any name.
        type: ``Linear`` or ``Conv2d``; None = both.
        exact: keep the matched layers exact.
        sampling: the matched layers' sampling (ignored when ``exact``).
        position: ``first`` or ``last``: only the model's first (last) Linear/Conv2d layer,
            in module order (``named_modules()``); None = any layer.

    Examples::

        >>> rule = LayerRule(match="block2.*", type="Conv2d", sampling=SamplingConfig("topk", ratio=0.3))
        >>> rule.matches("block2.0.conv1", nn.Conv2d(1, 1, 1)), rule.matches("block3.0.conv1", nn.Conv2d(1, 1, 1))
        (True, False)
        >>> rule.describe()
        "match='block2.*' type='Conv2d' sampler=topk ratio=0.3"
    """

    match: str | None = None
    type: str | None = None
    exact: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    position: str | None = None

    def __post_init__(self) -> None:
        if self.type is not None and self.type not in LAYER_TYPES:
            raise ValueError(f"layer rule type={self.type!r} is unknown; allowed: {', '.join(LAYER_TYPES)}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"layer rule position={self.position!r} is unknown; allowed: {', '.join(POSITIONS)}")
        if self.match is not None and self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as error:
                raise ValueError(f"layer rule match={self.match!r} is not a valid regular expression ({error})") from None

    def matches(self, name: str, module: nn.Module, positions: Sequence[str] = ()) -> bool:
        """Whether the rule selects layer ``name``; ``positions``: which of ``first``/``last`` the layer is."""
        if self.type is not None and _layer_type(module) != self.type:
            return False
        if self.position is not None and self.position not in positions:
            return False
        if self.match is None:
            return True
        if self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.match)

    def describe(self) -> str:
        parts = [f"{key}={value!r}" for key, value in (("match", self.match), ("type", self.type), ("position", self.position))
                 if value is not None]
        parts.append("exact" if self.exact else f"sampler={self.sampling.policy} ratio={self.sampling.ratio:g}")
        return " ".join(parts)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], default: SamplingConfig) -> LayerRule:
        """Build from a mapping: ``match``, ``type``, ``exact`` and any :class:`SamplingConfig`
        field (``sampler`` is accepted for ``policy``); omitted fields come from ``default``."""
        values = dict(values)
        if "sampler" in values:
            values["policy"] = values.pop("sampler")
        sampling_keys = {f.name for f in fields(SamplingConfig)}
        unknown = sorted(set(values) - sampling_keys - set(_RULE_KEYS))
        if unknown:
            allowed = sorted({"sampler", *_RULE_KEYS, *sampling_keys})
            raise ValueError(f"layer rule {dict(values)} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        overrides = {key: values[key] for key in sampling_keys if key in values}
        sampling = SamplingConfig.from_dict({**default.to_dict(), **overrides})
        exact = values.get("exact", False)
        if not isinstance(exact, bool):
            raise ValueError(f"layer rule exact={exact!r} is invalid; allowed: true, false")
        return cls(values.get("match"), values.get("type"), exact or sampling.is_exact, sampling, values.get("position"))


def rules_from_dicts(items: Iterable[Mapping[str, Any]], default: SamplingConfig) -> list[LayerRule]:
    """:meth:`LayerRule.from_dict` over a sequence, in order.

    Examples::

        >>> rules = rules_from_dicts([{"match": "fc1", "exact": True}, {"ratio": 0.3}], SamplingConfig("topk", ratio=0.5))
        >>> [rule.describe() for rule in rules]
        ["match='fc1' exact", 'sampler=topk ratio=0.3']
    """
    return [LayerRule.from_dict(item, default) for item in items]


@dataclass
class PlanRow:
    """One layer of a :class:`Plan`.

    ``n``: column-row pairs of its forward product (input features / channels);
    ``k``: pairs kept (expected number for ``bernoulli``); MACs are per training
    step at the plan's batch size (zero when no example input was given).
    """

    name: str  # the layer's qualified name in the model (``block1.0.conv1``)
    type: str  # ``Linear``, ``Conv2d``, ``LSTM``, ...
    n: int  # column-row pairs of its forward product: input features (Linear) or input channels (Conv2d)
    k: int  # pairs kept (the expected number for ``bernoulli``; n for an exact layer)
    ratio: float  # the forward ratio its rule set
    policy: str  # its sampler policy, or ``exact``
    rule: int | None  # the index of the layer rule it took; null when none matched (it stays exact)
    note: str = ""  # why a layer stays exact or how it is sampled (``grouped conv``, ``backward-only``, ...)
    # exact training's MACs of one step at the plan's batch size, per product (zero without an example input)
    exact_macs: ProductMACs = field(default_factory=ProductMACs)
    approx_macs: ProductMACs = field(default_factory=ProductMACs)  # this plan's MACs of that step, likewise

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["exact_macs"] = self.exact_macs.total
        row["approx_macs"] = self.approx_macs.total
        row["macs"] = {"exact": asdict(self.exact_macs), "approx": asdict(self.approx_macs)}
        return row


@dataclass
class Plan:
    """What surgery did, layer by layer, and the compute reduction it implies."""

    rows: list[PlanRow]
    batch_size: int | None = None

    @property
    def exact_macs(self) -> int:
        return sum(row.exact_macs.total for row in self.rows)

    @property
    def approx_macs(self) -> int:
        return sum(row.approx_macs.total for row in self.rows)

    @property
    def compute_reduction(self) -> float:
        """Expected share of MACs saved per training step (0 without MACs)."""
        return compute_reduction(self.exact_macs, self.approx_macs)

    def unmetered(self) -> list[str]:
        """The modules holding products the plan (and the meter) leave out, as ``name (type)``: attention's
        activation products, layers surgery does not know (``nn.Conv1d``, a raw Parameter)."""
        return [f"{row.name} ({row.type})" for row in self.rows if row.type not in (*LAYER_TYPES, "LSTM")]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.rows]

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'type':<7} {'n':>6} {'k':>6} {'policy':<9} {'MACs/step':>14}  note"]
        for row in self.rows:
            lines.append(f"{row.name:<28} {row.type:<7} {row.n:>6} {row.k:>6} {row.policy:<9} {row.exact_macs.total:>14,}  {row.note}")
        lines.append(f"compute reduction: {self.compute_reduction:.1%}")
        return "\n".join(lines)


def _layer_type(module: nn.Module) -> str | None:
    """The product a layer computes (``Linear``, ``Conv2d``: see :mod:`approxtrain.adapters`), ``LSTM``, or None."""
    if isinstance(module, nn.LSTM):
        return "LSTM"
    adapter = adapter_of(module)
    return adapter.kind if adapter is not None else None


def _pairs(module: nn.Module) -> int:
    if isinstance(module, nn.LSTM):
        return module.input_size + module.hidden_size
    return adapter_of(module).pairs(module)  # type: ignore[union-attr]


def _positions(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Layer name -> which of ``first``/``last`` it is, for the Linear/Conv2d layers ``names`` in module order."""
    positions: dict[str, tuple[str, ...]] = {}
    for position, name in zip(POSITIONS, (names[0], names[-1]) if names else ()):
        positions[name] = (*positions.get(name, ()), position)
    return positions


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _as_exact(module: nn.Module) -> nn.Module:
    if not isinstance(module, SampledLayer):
        return module
    base = _rebind(module.exact_class, module)
    for attribute in ("sampling", "generator", "compute", "scoring", "kept_pairs"):
        base.__dict__.pop(attribute, None)
    return base


# The methods whose computation the approximate layers reproduce: a subclass overriding any of them
# (timm's StdConv2d standardises its weight in forward, Conv2dSame pads there) computes something else.
_REPRODUCED = {nn.Linear: ("forward",), nn.Conv2d: ("forward", "_conv_forward")}
_OURS = {nn.Linear: ApproxLinear, nn.Conv2d: ApproxConv2d}


def own_computation(module: nn.Module) -> str | None:
    """Why surgery cannot reproduce ``module``'s products (a Linear/Conv2d subclass overriding
    ``forward``/``_conv_forward``: ``"StdConv2d overrides forward"``); None when it can."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return None  # an adapted layer: its adapter reproduces it
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
    for method in _REPRODUCED[base]:
        if getattr(type(module), method) not in (getattr(base, method), getattr(_OURS[base], method)):
            return f"{type(module).__name__} overrides {method}"
    return None


def _swap_layer(model: nn.Module, name: str, module: nn.Module, index: int | None, rule: LayerRule | None,
                generator: torch.Generator | None) -> PlanRow:
    """Make Linear/Conv2d layer ``name`` exact or approximate by ``rule`` (rule ``index``); its plan row."""
    note = ""
    if rule is None or rule.exact or rule.sampling.is_exact:
        new = _as_exact(module)
        note = "no rule" if rule is None else f"{rule.position} layer" if rule.position is not None else ""
        sampling = None
    elif (reason := own_computation(module)) is not None:
        new, sampling = module, None
        note = f"kept exact: {reason}"
    elif isinstance(module, nn.Conv2d) and module.groups != 1:
        new, sampling = _as_exact(module), None
        note = f"groups={module.groups} > 1: kept exact"
    else:
        sampling = rule.sampling
        adapter = adapter_of(module)
        new, note = adapter.approximate(_as_exact(module), sampling, generator), adapter.note  # type: ignore[union-attr]
    if new is not module:
        _set_submodule(model, name, new)
    n = _pairs(module)
    k = sampling.k(n) if sampling is not None else n
    if sampling is not None and sampling.align_k > 1:
        note = f"k rounded up to a multiple of {sampling.align_k} (align_k)"
    if sampling is not None and sampling.mode == "backward":
        note = f"backward-only: forward exact, gradient products at ratio {sampling.ratio:g}"
    policy = sampling.policy if sampling is not None else "exact"
    return PlanRow(name, _layer_type(module), n, k, k / n, policy, index, note)  # type: ignore[arg-type]


def _exact_products_rows(name: str, module: nn.Module) -> list[PlanRow]:
    """The row of a module that is no Linear/Conv2d/LSTM layer but holds products surgery leaves exact:
    attention's activation products, an unsupported ``nn.MultiheadAttention``, or a weight of
    another kind (Conv1d, GRU, a raw Parameter); none for one without (ReLU, norms, an embedding's lookup)."""
    if isinstance(module, ProjectedMultiheadAttention):
        return [PlanRow(name, "Attention", module.head_dim, module.head_dim, 1.0, "exact", None,
                        "Q·Kᵀ and weights·V: activation products (no weight), exact; not in the MACs")]
    if isinstance(module, nn.MultiheadAttention):
        return [PlanRow(name, "MultiheadAttention", module.embed_dim, module.embed_dim, 1.0, "exact", None,
                        f"{unsupported(module)}: torch's kernel, all its products exact; not in the MACs")]
    weights = [key for key, parameter in module.named_parameters(recurse=False) if parameter.dim() >= 2]
    if not weights or isinstance(module, nn.Embedding):  # an embedding is a lookup: no product
        return []
    return [PlanRow(name or "(model)", type(module).__name__, 0, 0, 1.0, "exact", None,
                    f"{', '.join(weights)}: not a Linear/Conv2d/LSTM weight, its products exact; not in the MACs")]


def _unused_rule_message(index: int, rules: Sequence[LayerRule], rows: Sequence[PlanRow], layers: Mapping[str, nn.Module],
                         positions: Mapping[str, tuple[str, ...]]) -> str:
    """Why rule ``index`` selects no layer: the layers it would select took an earlier rule (a model
    whose one layer is both first and last), or none fits it; the layers and the products surgery cannot sample."""
    rule = rules[index]
    head = f"layer rule #{index + 1} ({rule.describe()}) matches no layer"
    taken = [row for row in rows if row.type in LAYER_TYPES and row.rule is not None and row.rule < index
             and rule.matches(row.name, layers[row.name], positions.get(row.name, ()))]
    if taken:
        said = ", ".join(f"{row.name} took rule #{row.rule + 1}" for row in taken[:3])  # type: ignore[operator]
        return f"{head}: every layer it selects took an earlier rule first ({said}); layers: {_layer_names(rows)}"
    unsampled = [f"{row.name} ({row.type})" for row in rows if row.type not in (*LAYER_TYPES, "LSTM", "Attention")]
    cannot = f"; products surgery cannot sample: {', '.join(unsampled[:5])}" if unsampled else ""
    return f"{head}; layers: {_layer_names(rows)}{cannot}"


def _layer_names(rows: Sequence[PlanRow]) -> str:
    return ", ".join(row.name for row in rows if row.type in LAYER_TYPES) or _NO_LAYERS


def approximate_(
    model: nn.Module,
    rules: Sequence[LayerRule],
    *,
    generator: torch.Generator | None = None,
    example_input: Any = None,
    batch_size: int | None = None,
) -> Plan:
    """Swap ``model``'s Linear/Conv2d layers for approximate ones, in place, by ``rules``.

    Each layer takes the first rule that matches it; layers no rule matches stay
    exact. Grouped convolutions stay exact, and so do subclasses that compute something else
    (override ``forward``/``_conv_forward``, as timm's ``StdConv2d`` does): the plan's note says
    why, and their products are counted as exact. Every supported
    ``nn.MultiheadAttention`` is first replaced by a
    :class:`~approxtrain.attention.ProjectedMultiheadAttention` (its input projection in new
    Parameters: build the optimizer afterwards). With ``example_input``, a layer the
    forward never calls as a module is made exact (its row says so).

    Args:
        model: any module; changed in place.
        rules: ordered rules. A rule that selects no layer is an error naming it.
        generator: randomness shared by the random samplers (on the model's device).
        example_input: a batch to trace once (eval mode, grad enabled) for the MACs;
            without it the plan's MACs are zero.
        batch_size: training batch size the MACs are given for (default: the
            example's batch).

    Returns:
        The :class:`Plan`.

    Examples::

        >>> model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))
        >>> plan = approximate_(model, [LayerRule(sampling=SamplingConfig("topk", ratio=0.4))],
        ...                     example_input=torch.zeros(2, 784), batch_size=50)
        >>> print(plan)
        layer                        type         n      k policy         MACs/step  note
        0                            Linear     784    314 topk          39,200,000
        2                            Linear     500    200 topk          37,500,000
        4                            Linear     500    200 topk             750,000
        compute reduction: 60.0%
        >>> model[0]
        ApproxLinear(in_features=784, out_features=500, bias=True, sampler=topk, ratio=0.4, k=314/784)
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and unsupported(module) is None:
            _set_submodule(model, name, ProjectedMultiheadAttention.from_multihead_attention(module))
    modules = list(model.named_modules())
    layers = [(name, module) for name, module in modules if _layer_type(module) is not None]
    positions = _positions([name for name, module in layers if _layer_type(module) in LAYER_TYPES])
    used = [False] * len(rules)
    rows: list[PlanRow] = []
    for name, module in modules:
        if _layer_type(module) is None:
            rows.extend(_exact_products_rows(name, module))
            continue
        if isinstance(module, nn.LSTM):
            rows.append(PlanRow(name, "LSTM", _pairs(module), _pairs(module), 1.0, "exact", None,
                                "cuDNN LSTM: gate products exact (layers=gates samples them)"))
            continue
        index = next((i for i, rule in enumerate(rules) if rule.matches(name, module, positions.get(name, ()))), None)
        if index is not None:
            used[index] = True
        rows.append(_swap_layer(model, name, module, index, rules[index] if index is not None else None, generator))
    unused = used.index(False) if not all(used) else None
    if unused is not None:
        raise ValueError(_unused_rule_message(unused, rules, rows, dict(layers), positions))
    plan = Plan(rows, batch_size)
    if example_input is not None:
        _fill_macs(model, plan, example_input, batch_size)
    return plan


def nothing_sampled_warning(plan: Plan, rules: Sequence[LayerRule]) -> str | None:
    """One line when ``rules`` ask for sampling but the plan samples no layer, naming the layers
    asked for and why each stays exact (never called as a module, a subclass with its own forward,
    a grouped convolution); None otherwise."""
    if any(row.policy != "exact" for row in plan.rows):
        return None
    asked = [row for row in plan.rows if row.rule is not None and not rules[row.rule].exact]
    if not asked:
        return None
    reasons: dict[str, list[str]] = {}
    for row in asked:
        reasons.setdefault(row.note.split(": its products")[0] or "kept exact", []).append(row.name)
    said = "; ".join(f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: {reason}"
                     for reason, names in reasons.items())
    return f"nothing is sampled although the layer rules ask for it: {said}; compute_reduction is 0.0"


@dataclass
class _Call:
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_grad: bool


def _layer_shape(module: nn.Module, input_shape: Sequence[int], output_shape: Sequence[int],
                 factor: float = 1.0) -> LayerShape:
    """A Linear's or Conv2d's :class:`LayerShape` in one call, its batch scaled by ``factor``."""
    adapter = adapter_of(module)
    if adapter is not None and adapter.kind == "Linear":
        return LayerShape.linear(round(math.prod(input_shape[:-1]) * factor), adapter.pairs(module), adapter.outputs(module))
    assert isinstance(module, nn.Conv2d)
    return LayerShape.conv2d(round(output_shape[0] * factor), module.in_channels, module.out_channels,
                             module.kernel_size, output_shape[2:], module.groups)


def exact_layer_macs(module: nn.Module, input_shape: Sequence[int], output_shape: Sequence[int], input_grad: bool,
                     weight_grad: bool = True) -> ProductMACs:
    """MACs exact training spends in one call of a Linear, Conv2d or LSTM layer."""
    if isinstance(module, nn.LSTM):
        rows = input_shape[0] * input_shape[1] if len(input_shape) == 3 else input_shape[0]
        return lstm_stack_macs(rows, module.input_size, module.hidden_size, module.num_layers,
                               2 if module.bidirectional else 1, input_grad=input_grad, weight_grad=weight_grad)
    return _layer_shape(module, input_shape, output_shape).macs(input_grad=input_grad, weight_grad=weight_grad)


def _approx_layer_macs(module: nn.Module, call: _Call, factor: float) -> tuple[ProductMACs, ProductMACs]:
    """Exact and sampled MACs of one call of an approximate layer, at ``factor`` times its batch."""
    shape = _layer_shape(module, call.input_shape, call.output_shape, factor)
    return sampled_macs(shape, module.sampling, input_grad=call.input_grad,  # type: ignore[arg-type]
                        weight_grad=weight_requires_grad(module))


def _scale(macs: ProductMACs, factor: float) -> ProductMACs:
    return ProductMACs(round(macs.forward * factor), round(macs.input_grad * factor), round(macs.weight_grad * factor))


def _batch_of(example_input: Any) -> int:
    first = example_input[0] if isinstance(example_input, (tuple, list)) else example_input
    return first.shape[0]


def _fill_macs(model: nn.Module, plan: Plan, example_input: Any, batch_size: int | None) -> None:
    """Trace ``example_input`` once to fill the layer rows' MACs; a layer the forward never calls as
    a module (its weight used directly, as ``F.linear(x, layer.weight)`` does) is made exact, and its row says so."""
    layer_rows = [row for row in plan.rows if row.type in (*LAYER_TYPES, "LSTM")]
    calls: dict[str, list[_Call]] = {row.name: [] for row in layer_rows}
    modules = dict(model.named_modules())

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            input = args[0]
            out = output[0] if isinstance(output, tuple) else output
            calls[name].append(_Call(tuple(input.shape), tuple(out.shape), bool(input.requires_grad)))
        return record

    handles = [modules[row.name].register_forward_hook(hook(row.name)) for row in layer_rows]
    modes = {name: module.training for name, module in modules.items()}
    reset_state = getattr(model, "reset_state", None)
    try:
        model.eval()
        with torch.enable_grad():
            model(*example_input) if isinstance(example_input, (tuple, list)) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            module.training = modes[name]
        if callable(reset_state):
            reset_state()
    example_batch = _batch_of(example_input)
    factor = (batch_size or example_batch) / example_batch
    plan.batch_size = batch_size or example_batch
    for row in layer_rows:
        module = modules[row.name]
        if not calls[row.name]:  # not traced: nothing to count, and it is made exact so that the plan holds
            _set_submodule(model, row.name, _as_exact(module))
            row.k, row.ratio, row.policy = row.n, 1.0, "exact"
            row.note = "never called as a module (its weight is used directly): its products exact; not in the MACs"
        exact = approx = ProductMACs()
        for call in calls[row.name]:
            if isinstance(module, SampledLayer):
                e, a = _approx_layer_macs(module, call, factor)
            else:
                e = _scale(exact_layer_macs(module, call.input_shape, call.output_shape, call.input_grad,
                                            any(p.requires_grad for p in module.parameters())), factor)
                a = e
            exact, approx = exact + e, approx + a
        row.exact_macs, row.approx_macs = exact, approx


def attach_meter(model: nn.Module, meter: ComputeMeter) -> list[RemovableHandle]:
    """Make ``model`` record its training MACs into ``meter``, one entry per layer.

    Approximate layers record what their sampled products ran (forward now, the
    backward products when backward runs); exact Linear/Conv2d/LSTM layers are
    counted by forward hooks. Only training-mode calls are counted. Call it after
    :func:`approximate_` (surgery makes new layer objects). Returns the hook handles
    (``handle.remove()`` detaches).

    Examples::

        >>> model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 10))
        >>> plan = approximate_(model, [LayerRule(match="0", sampling=SamplingConfig("topk", ratio=0.5))])
        >>> meter = ComputeMeter()
        >>> handles = attach_meter(model, meter)
        >>> model(torch.randn(50, 784)).sum().backward()  # one training step's products
        >>> meter.exact.forward, meter.actual.forward  # layer 0 ran 392 of its 784 pairs
        (19850000, 10050000)
        >>> round(meter.compute_reduction, 3)
        0.491
    """
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        if isinstance(module, SampledLayer):
            module.compute = meter.entry(name)
        elif _layer_type(module) is not None:
            entry = meter.entry(name)

            def count(module: nn.Module, args: tuple, output: Any, entry=entry) -> None:
                if not module.training or isinstance(module, SampledLayer):
                    return  # an approximate layer records its own products
                out = output[0] if isinstance(output, tuple) else output
                grad = torch.is_grad_enabled()
                macs = exact_layer_macs(module, args[0].shape, out.shape, grad and args[0].requires_grad,
                                        grad and module.weight_ih_l0.requires_grad if isinstance(module, nn.LSTM)
                                        else grad and weight_requires_grad(module))
                if not grad:
                    macs = ProductMACs(macs.forward, 0, 0)
                entry.record(macs, macs)

            handles.append(module.register_forward_hook(count))
    return handles
