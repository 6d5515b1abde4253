"""approxtrain: neural-network training with approximate (column-row sampled) tensor operations.

The core library -- samplers, approximate ops and modules, model surgery and
compute accounting -- depends on PyTorch only, so it can be used in any training
loop::

    from approxtrain import LayerRule, SamplingConfig, approximate_, attach_meter, ComputeMeter

    plan = approximate_(model, [LayerRule(match="conv1", exact=True),
                                LayerRule(sampling=SamplingConfig("topk", ratio=0.5))],
                        example_input=x[:2], batch_size=128)
    meter = ComputeMeter(); attach_meter(model, meter)
    ...  # train as usual
    print(plan, meter.compute_reduction)
"""

from approxtrain.accounting import ComputeMeter, LayerCompute, ProductMACs, compute_reduction
from approxtrain.attention import ProjectedMultiheadAttention
from approxtrain.functional import approx_conv2d, approx_linear
from approxtrain.modules import ApproxConv2d, ApproxLinear
from approxtrain.sampling import POLICIES, SamplingConfig, Selection, num_kept, select
from approxtrain.surgery import LayerRule, Plan, PlanRow, approximate_, attach_meter, rules_from_dicts

__all__ = [
    "POLICIES",
    "ApproxConv2d",
    "ApproxLinear",
    "ComputeMeter",
    "LayerCompute",
    "LayerRule",
    "Plan",
    "PlanRow",
    "ProductMACs",
    "ProjectedMultiheadAttention",
    "SamplingConfig",
    "Selection",
    "approx_conv2d",
    "approx_linear",
    "approximate_",
    "attach_meter",
    "compute_reduction",
    "num_kept",
    "rules_from_dicts",
    "select",
]
__version__ = "0.1.0"
