"""Approximation telemetry: how good each sampled layer's products are, on the batch being trained.

Every ``every`` steps, per approximate layer:

* ``forward_error``: ``|Y_sampled - X W^T| / |X W^T|`` (Frobenius norms, bias left out): the
  relative error of the forward product that ran against the exact one on the same input;
* ``discarded_share``: the share of the score mass ``|A^(i)| |B_(i)|`` outside the ``k``
  largest pairs (for ``topk`` what was dropped; for random policies the share the best ``k``
  pairs would drop, a lower bound);
* ``grad_cosine``: the cosine similarity of the weight gradient the step computed with the exact
  one, from one extra exact forward and backward on the same batch (same dropout masks: the
  random state is replayed; nothing else changes). A parametrized weight (``weight_norm``) is
  computed: the gradient compared is that of the Parameters it is computed from, together.

Used in a loop of one's own::

    telemetry = Telemetry(model, every=100)
    for step, (x, y) in enumerate(loader):
        probe = telemetry.watch() if telemetry.due(step) else None
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if probe is not None:
            rows = telemetry.measure(probe, lambda: loss_fn(model(x), y), step=step)
        optimizer.step()

Off (``every = 0``) nothing runs. No Hydra, W&B or rich here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from approxtrain.modules import SampledLayer
from approxtrain.schedule import discarded_share, layer_pairs, pair_scores, sampled_layers


@dataclass
class LayerTelemetry:
    """One sampled layer at one telemetry step (a row of ``results.json``'s ``telemetry``)."""

    step: int  # the optimizer step it was measured at
    epoch: int | None  # the epoch of that step
    layer: str  # the layer's qualified name
    k: int  # pairs the layer kept at that step
    n: int  # pairs of its forward product
    forward_error: float  # relative error of the forward product that ran, |Y_sampled - XW^T| / |XW^T| (bias left out)
    # the score mass outside the k largest pairs: for topk what was dropped; for random samplers
    # the share the best k would drop
    discarded_share: float
    # cosine of the step's weight gradient with the exact one (one extra exact forward and backward on
    # that batch); None when the weight takes no gradient
    grad_cosine: float | None


@dataclass
class Probe:
    """What a telemetry step keeps from the training forward: each layer's input and output,
    and the random state the forward started from."""

    handles: list[RemovableHandle]
    calls: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _product(module: SampledLayer, input: Tensor) -> Tensor:
    """The layer's exact product, without bias, in float32 (``_conv_forward`` pads as the layer does)."""
    weight = module.product_weight().float()
    if module.kind == "Linear":
        return F.linear(input.float(), weight)
    return module._conv_forward(input.float(), weight, None)  # type: ignore[attr-defined]


def _without_bias(module: SampledLayer, output: Tensor) -> Tensor:
    if module.bias is None:  # type: ignore[attr-defined]
        return output.float()
    shape = (-1,) if module.kind == "Linear" else (-1, 1, 1)
    return output.float() - module.bias.float().view(shape)  # type: ignore[attr-defined]


def _weight_gradient(module: SampledLayer) -> Tensor | None:
    """The step's gradient of the Parameters the layer's weight is (computed from), flattened together;
    None when they take none."""
    grads = [parameter.grad for parameter in module.weight_parameters()]
    return None if any(grad is None for grad in grads) else torch.cat([grad.flatten() for grad in grads])  # type: ignore


def _cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else float(torch.equal(a, b))


@contextmanager
def exact_layers(layers: dict[str, SampledLayer]) -> Iterator[None]:
    """Inside, every layer of ``layers`` runs its exact products (policy ``exact``)."""
    saved = {name: module.sampling for name, module in layers.items()}
    try:
        for module in layers.values():
            module.sampling = replace(module.sampling, policy="exact")
        yield
    finally:
        for name, module in layers.items():
            module.sampling = saved[name]


class Telemetry:
    """Per-layer approximation error of a model's sampled layers, every ``every`` steps (0: never)."""

    def __init__(self, model: nn.Module, every: int) -> None:
        self.layers = sampled_layers(model)
        self.every = every

    def due(self, step: int) -> bool:
        """Whether the 0-based training step ``step`` is measured: every ``every``-th step, the first included."""
        return self.every > 0 and bool(self.layers) and step % self.every == 0

    def watch(self) -> Probe:
        """Call before the training forward: keep each layer's input and output, and the random state."""
        probe = Probe(handles=[])

        def keep(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                probe.calls.setdefault(name, (args[0].detach(), output.detach()))  # a layer called twice: its first call
            return hook

        probe.handles = [module.register_forward_hook(keep(name)) for name, module in self.layers.items()]
        probe.rng = _rng_state()
        return probe

    def measure(self, probe: Probe, exact_loss: Callable[[], Tensor], *, step: int, epoch: int | None = None,
                average: Callable[[Tensor], Tensor] | None = None) -> list[LayerTelemetry]:
        """Call after the training backward (the weights' ``.grad`` hold the sampled step's gradients):
        ``exact_loss()`` recomputes the loss of the same batch, run here with exact layers. Under
        data-parallel training the ``.grad`` are averaged over the processes: ``average`` (e.g. an
        all-reduce mean) does the same to each exact gradient, so both sides are the global batch's."""
        for handle in probe.handles:
            handle.remove()
        rows = {name: self._forward_row(name, *probe.calls[name], step, epoch) for name in self.layers if name in probe.calls}
        approx = {name: _weight_gradient(self.layers[name]) for name in rows}
        trained = [name for name in rows if approx[name] is not None]
        if trained:
            exact = self._exact_gradients(trained, exact_loss, probe.rng, average)
            for name in trained:
                if exact[name] is not None:
                    rows[name].grad_cosine = _cosine(approx[name], exact[name])  # type: ignore[arg-type]
        return list(rows.values())

    def _exact_gradients(self, names: list[str], exact_loss: Callable[[], Tensor], rng: dict[str, Any],
                         average: Callable[[Tensor], Tensor] | None) -> dict[str, Tensor | None]:
        """Each named layer's weight gradient (as :func:`_weight_gradient` flattens it) from ``exact_loss()``
        run with exact layers from the random state ``rng``; None for a layer the loss does not reach."""
        parameters = {name: self.layers[name].weight_parameters() for name in names}
        after = _rng_state()
        _set_rng_state(rng)
        try:
            with torch.enable_grad(), exact_layers(self.layers):
                flat = torch.autograd.grad(exact_loss(), [p for name in names for p in parameters[name]], allow_unused=True)
        finally:
            _set_rng_state(after)
        if average is not None:
            flat = tuple(average(grad) if grad is not None else None for grad in flat)
        grads, start = {}, 0
        for name in names:
            own = flat[start:start + len(parameters[name])]
            start += len(own)
            grads[name] = None if any(g is None for g in own) else torch.cat([g.flatten() for g in own])  # type: ignore
        return grads

    @torch.no_grad()
    def _forward_row(self, name: str, input: Tensor, output: Tensor, step: int, epoch: int | None) -> LayerTelemetry:
        module = self.layers[name]
        n = layer_pairs(module)
        k = module.sampling.k(n)
        exact = _product(module, input)
        denominator = exact.norm().item()
        error = (_without_bias(module, output) - exact).norm().item()
        return LayerTelemetry(step, epoch, name, k, n, error / denominator if denominator > 0 else error,
                              discarded_share(pair_scores(module, input), k), None)


def telemetry_rows(rows: list[LayerTelemetry]) -> list[dict[str, Any]]:
    """Plain dicts (for ``results.json`` and W&B)."""
    return [asdict(row) for row in rows]


MEASURES = ("forward_error", "discarded_share", "grad_cosine")


def telemetry_scalars(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The latest measurement per layer of ``rows`` as flat scalars, ``telemetry/<layer>/<measure>`` (for W&B)."""
    return {f"telemetry/{row['layer']}/{measure}": row[measure] for row in rows for measure in MEASURES
            if row[measure] is not None}
