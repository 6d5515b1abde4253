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

import importlib
from typing import Any

# name -> the module that defines it; imported on first use (PEP 562), so importing a torch-free
# part of the package (the CLI's config store, ``approxtrain --help``) does not import torch
_EXPORTS = {
    "approxtrain.accounting": ("ComputeMeter", "LayerCompute", "ProductMACs", "compute_reduction"),
    "approxtrain.attention": ("ProjectedMultiheadAttention",),
    "approxtrain.functional": ("approx_conv2d", "approx_linear"),
    "approxtrain.modules": ("ApproxConv2d", "ApproxLinear"),
    "approxtrain.policies": ("SamplerPolicy", "get_policy", "policy_names", "register_policy"),
    "approxtrain.sampling": ("POLICIES", "SamplingConfig", "Selection", "num_kept", "select"),
    "approxtrain.surgery": ("LayerRule", "Plan", "PlanRow", "approximate_", "attach_meter", "rules_from_dicts"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'approxtrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # the next access does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = sorted(_MODULE_OF)
__version__ = "0.1.0"
