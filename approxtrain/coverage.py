"""Coverage: the share of a training step's matrix products that the compute meter accounts for.

The meter (:mod:`approxtrain.accounting`) counts the products of the layers surgery knows --
Linear, Conv2d (and the kinds :mod:`approxtrain.adapters` adapts), LSTM --, and
``compute_reduction`` is a share of those. Everything else a step multiplies -- attention's
``Q Kᵀ`` and ``weights V``, layers surgery cannot sample (``nn.Conv1d``, a raw Parameter),
``torch.nn.functional`` calls of the model's own -- is outside it. :func:`step_flops` counts them
all once, with ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward, and
:func:`coverage` is the share the meter sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from approxtrain.surgery import Plan

COVERAGE_WARNING_BELOW = 0.5  # a run whose sampling reaches less of the step's products says so
# ops of products between activations (attention's Q·Kᵀ and weights·V; torch's math attention runs them)
BATCHED_PRODUCTS = ("aten.bmm", "aten.baddbmm", "aten._scaled_dot_product")


def _cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels, not the CPU one scaled_dot_product_attention runs here
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


@dataclass(frozen=True)
class StepProducts:
    """The FLOPs of one training step's matrix products and convolutions, per aten op."""

    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    @property
    def batched(self) -> int:
        """FLOPs of products between activations (``bmm``, attention kernels): never a layer's."""
        return sum(flops for op, flops in self.by_op.items() if op.startswith(BATCHED_PRODUCTS))


def step_products(model: nn.Module, loss_of: Callable[[nn.Module], Tensor]) -> StepProducts:
    """The matrix products and convolutions of one training step: ``loss_of(model)``'s forward and its
    gradient with respect to the trainable Parameters, counted by ``FlopCounterMode`` (which does not
    see an ``nn.LSTM``'s fused kernel).

    Side-effect free: run in eval mode (no dropout, batch-norm statistics untouched, the approximate
    layers exact and unmetered), no ``.grad`` written, every module's mode restored.

    Examples::

        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> products = step_products(model, lambda m: m(torch.randn(3, 8)).sum())
        >>> products.total  # 2 FLOPs x (forward 96 + 24 MACs, weight gradients 96 + 24, layer 2's input gradient 24)
        528
    """
    modes = {module: module.training for module in model.modules()}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    try:
        model.eval()
        with counter, torch.enable_grad():
            loss = loss_of(model)
            if trainable and loss.requires_grad:
                torch.autograd.grad(loss, trainable, allow_unused=True)
    finally:
        for module, training in modes.items():
            module.training = training
    return StepProducts({str(op): flops for op, flops in counter.get_flop_counts().get("Global", {}).items() if flops})


def coverage(metered_macs: int, products: StepProducts, unseen_macs: int = 0) -> float:
    """The share of a step's product FLOPs that ``metered_macs`` (the meter's exact MACs of the same step;
    a MAC is two FLOPs) accounts for; ``unseen_macs``: metered MACs the FLOP counter cannot see (an
    LSTM's), added to both sides. 0.0 for a step without products.

    Examples::

        >>> coverage(metered_macs=150, products=StepProducts({"aten.mm": 300, "aten.bmm": 100}))
        0.75
    """
    total = products.total + 2 * unseen_macs
    return min(1.0, 2 * metered_macs / total) if total else 0.0


def plan_coverage(plan: Plan, products: StepProducts, example_batch: int) -> float:
    """:func:`coverage` of ``plan``'s layers, its MACs (at ``plan.batch_size``) scaled to the
    ``example_batch`` examples ``products`` were counted on (every product is linear in the batch)."""
    scale = example_batch / plan.batch_size if plan.batch_size else 1.0
    lstm = sum(row.exact_macs.total for row in plan.rows if row.type == "LSTM")
    return coverage(round(plan.exact_macs * scale), products, round(lstm * scale))


def coverage_warning(share: float, products: StepProducts, unmetered: Sequence[str]) -> str | None:
    """One line when the meter (so the sampling) reaches less than half the step's products, saying
    what computes the rest: attention's activation products (their share), the plan's modules whose
    products stay outside (``unmetered``), the model's own ``torch.nn.functional`` calls; None otherwise."""
    if share >= COVERAGE_WARNING_BELOW:
        return None
    batched = products.batched / products.total if products.total else 0.0
    causes = [f"products between activations (attention's Q·Kᵀ and weights·V) {batched:.1%}"] if batched else []
    rest = 1.0 - share - batched
    if rest > 0.005:
        named = ", ".join(unmetered[:3]) + (f" and {len(unmetered) - 3} more" if len(unmetered) > 3 else "")
        where = f"{named}, or torch.nn.functional calls of the model's own" if unmetered else \
            "torch.nn.functional calls of the model's own or layers surgery does not know"
        causes.append(f"other products {rest:.1%} ({where})")
    return (f"coverage {share:.1%}: the layers surgery can sample compute {share:.1%} of the step's matrix-product "
            f"FLOPs and compute_reduction speaks of those only; the rest: {'; '.join(causes)}")
