"""Your own ``nn.Module`` by dotted path: ``model=custom model._target_=my_pkg.nets.Net`` (+ its arguments).

The model is built with ``hydra.utils.instantiate`` from the model config less its
bookkeeping keys (``name``, ``paper_dataset``, ``paper_rules``). An argument may take a
fact of the dataset, ``${dataset_info:num_classes}`` (``in_channels``, ``image_size``,
``num_classes``, ``vocab_size``): the facts are known only once the data is loaded, so the
resolver (:func:`dataset_fact`, registered where configs are composed) leaves the reference
``${dataset.num_classes}``, which :func:`custom` resolves against the loaded dataset's
:class:`~approxtrain.data.DatasetInfo`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from torch import nn

from approxtrain.data import DatasetInfo
from approxtrain.models.registry import OptionCheck, register_model

DATASET_FACTS = tuple(field.name for field in fields(DatasetInfo) if field.name not in ("name", "kind", "metric"))
MISSING = "???"  # OmegaConf's mark of a value the command line must give
TARGET = OptionCheck(lambda value: isinstance(value, str) and "." in value.strip("."),
                     "the dotted path of a class or function that returns an nn.Module, e.g. my_pkg.nets.Net")


def dataset_fact(key: str) -> str:
    """The ``dataset_info`` resolver: ``${dataset_info:num_classes}`` -> ``${dataset.num_classes}``, resolved by :func:`custom`."""
    if key not in DATASET_FACTS:
        raise ValueError(f"${{dataset_info:{key}}} is not a dataset fact; allowed: {', '.join(DATASET_FACTS)}")
    return f"${{dataset.{key}}}"


def dataset_fact_hint(message: str) -> str:
    """For an error that ``${dataset.num_classes}`` is not found: how to write it; else ""."""
    match = re.search(r"Interpolation key 'dataset\.(\w+)' not found", message)
    if match is None or match.group(1) not in DATASET_FACTS:
        return ""
    return (f" (the dataset's facts are known once it is loaded: write ${{dataset_info:{match.group(1)}}}; "
            f"allowed: {', '.join(DATASET_FACTS)})")


def with_dataset_facts(arguments: Mapping[str, Any], info: DatasetInfo) -> dict[str, Any]:
    """``arguments`` with each ``${dataset.<fact>}`` replaced by ``info``'s fact (what the model was built with).

    Examples::

        >>> with_dataset_facts({"_target_": "m.Net", "classes": "${dataset.num_classes}"}, DatasetInfo("d", "image", num_classes=7))
        {'_target_': 'm.Net', 'classes': 7}
    """
    from omegaconf import OmegaConf

    config = OmegaConf.create({"model": dict(arguments), "dataset": asdict(info)})
    return OmegaConf.to_container(config, resolve=True)["model"]  # type: ignore[index,return-value]


@register_model("custom", kind=None, checks={"_target_": TARGET})
def custom(info: DatasetInfo, *, _target_: str = MISSING, **arguments: Any) -> nn.Module:
    """``_target_(**arguments)`` through ``hydra.utils.instantiate``; ``${dataset.<fact>}`` in an
    argument is ``info``'s fact (``image_size`` as a list ``[H, W]``). ``ValueError`` (one line)
    when the target cannot be imported or called, or returns no ``nn.Module``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config = OmegaConf.create({"model": {"_target_": _target_, **arguments}, "dataset": asdict(info)})
    try:
        model = instantiate(config.model, _convert_="all")
    except (InstantiationException, OmegaConfBaseException) as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"model._target_={_target_!r} cannot be built: {reason}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model._target_={_target_!r} returned a {type(model).__name__}; allowed: a target that returns an nn.Module")
    return model
