"""Config nodes made from code, stored in Hydra's ConfigStore; imported wherever configs are composed.

* ``sampler_fields`` (a root config, not a sampler choice): every sampler field with
  its default, from :class:`~approxtrain.sampling_fields.SamplingFields`. Each
  ``configs/sampler/*.yaml`` includes it (``- /sampler_fields@_here_``) and states only
  its name and what differs.
* ``trainer_fields`` (a root config): every ``trainer`` field with its default, from
  :class:`~approxtrain.spec.TrainerSpec`; ``configs/trainer/default.yaml`` includes it.
* group ``trainer/optimizer``: the optimizer presets a model config can pick in its defaults list
  (``- /trainer/optimizer@_global_.trainer.optimizer: adamw``; :data:`~approxtrain.spec.OPTIMIZER_PRESETS`).
  ``train.yaml`` composes the trainer group before the model, so the model's pick stands
  unless an experiment or the command line sets ``trainer.optimizer``.
* group ``model/paper_dataset``: one option per dataset whose shapes are known
  (``mnist``, ``ptb``, ...). A model config picks the paper's dataset in its defaults list
  (``- paper_dataset: mnist``), which sets ``model.paper_dataset``; ``train.yaml``'s
  dataset defaults to that choice (``dataset: ${model/paper_dataset}``).

It also registers the ``dataset_info`` resolver (``${dataset_info:num_classes}``, for the
arguments of a ``model=custom`` model: :func:`approxtrain.models.custom.dataset_fact`).
Nothing here imports torch, so ``approxtrain --help``, ``--cfg`` and shell completion stay quick.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from approxtrain.data.info import LIKES
from approxtrain.sampling_fields import sampler_defaults
from approxtrain.spec import OPTIMIZER_PRESETS, trainer_fields


def dataset_fact(key: str) -> str:
    """The ``dataset_info`` resolver (:func:`approxtrain.models.custom.dataset_fact`), imported when a
    config uses it: the models import torch, which composing a config does not need."""
    from approxtrain.models.custom import dataset_fact

    return dataset_fact(key)


def store_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="sampler_fields", node=sampler_defaults())
    store.store(name="trainer_fields", node=trainer_fields())
    for name, preset in OPTIMIZER_PRESETS.items():
        store.store(group="trainer/optimizer", name=name, node=preset)
    for dataset in LIKES:
        store.store(group="model/paper_dataset", name=dataset, node={"paper_dataset": dataset}, package="model")
    if not OmegaConf.has_resolver("dataset_info"):
        OmegaConf.register_new_resolver("dataset_info", dataset_fact)


store_configs()
