"""Selection modes (``trainer.distributed.selection``) as registered classes: each mode's scoring and
its ``same_on_every_rank``, which decides ``sampled_allreduce=auto`` and what validation refuses."""

from __future__ import annotations

import pytest
from torch import nn
from torch.nn.utils import parametrizations

from approxtrain.config import ConfigError, validate
from approxtrain.modules import ApproxLinear
from approxtrain.run.distributed import Distributed
from approxtrain.run.selection_modes import get_selection_mode, selection_mode_names
from approxtrain.sampling import SamplingConfig


def reduce_input(norms):
    return norms


def test_the_modes_are_registered_with_their_declarations():
    assert selection_mode_names() == ("global", "weights", "local")
    assert {name: get_selection_mode(name).same_on_every_rank for name in selection_mode_names()} == {
        "global": True, "weights": True, "local": False}
    with pytest.raises(ValueError, match="^trainer.distributed.selection='nearby' is invalid; allowed: global, weights, local$"):
        get_selection_mode("nearby")


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_mode_scores_as_it_says(world_size):
    scorings = {name: get_selection_mode(name).scoring(reduce_input, world_size) for name in selection_mode_names()}
    assert scorings["weights"].weights_only and scorings["weights"].reduce_input is None
    if world_size == 1:  # one process: the layer's own scores, except weights (the weights alone there too)
        assert scorings["global"] is None and scorings["local"] is None
    else:
        assert scorings["global"].reduce_input is reduce_input and not scorings["global"].weights_only
        assert scorings["local"].reduce_input is None and not scorings["local"].weights_only


@pytest.mark.parametrize("name", ["global", "weights", "local"])
def test_sampled_allreduce_auto_follows_same_on_every_rank(name, run_cfg):
    cfg = run_cfg(f"trainer.distributed.selection={name}")
    parallel = Distributed.of(validate(cfg).trainer.distributed, rank=0, world_size=2)
    assert parallel.allreduce == ("sampled" if get_selection_mode(name).same_on_every_rank else "full")
    if not get_selection_mode(name).same_on_every_rank:
        with pytest.raises(ConfigError, match=f"selection={name} .*allowed: false or auto, or selection=global/weights$"):
            validate(run_cfg(f"trainer.distributed.selection={name}", "trainer.distributed.sampled_allreduce=true"))


def test_attach_gives_each_layer_its_modes_scoring():
    model = nn.Sequential(ApproxLinear(6, 4, sampling=SamplingConfig("topk", ratio=0.5)), nn.ReLU(),
                          ApproxLinear(4, 2, sampling=SamplingConfig("topk", ratio=0.5)))
    scorings = Distributed(selection="weights").attach(model)
    assert list(scorings) == [model[0].weight, model[2].weight]
    assert all(layer.scoring is scorings[layer.weight].scoring and layer.scoring.weights_only for layer in (model[0], model[2]))
    assert {sliced.dim for sliced in scorings.values()} == {1}  # the input features: a Linear weight's columns
    assert model[0].scoring is not model[2].scoring  # each layer its own (its kept slices are its own)
    assert Distributed(selection="global").attach(model) == {}  # one process: the layers' scorings are left as they are
    assert model[0].scoring is scorings[model[0].weight].scoring


def test_attach_keys_by_parameters_and_leaves_a_parametrized_weights_gradient_whole():
    """A parametrized layer's weight is computed anew at each access: its gradient lands in the
    parametrization's own Parameters, dense (weight_norm's spreads over every input feature), so it is
    all-reduced in full; the layer still gets its scoring (the selection is shared)."""
    half = SamplingConfig("topk", ratio=0.5)
    model = nn.Sequential(ApproxLinear.from_linear(parametrizations.weight_norm(nn.Linear(6, 4)), half), nn.ReLU(),
                          ApproxLinear(4, 2, sampling=half))
    scorings = Distributed(selection="weights").attach(model)
    parameters = set(model.parameters())
    assert all(parameter in parameters for parameter in scorings) and list(scorings) == [model[2].weight]
    assert model[0].scoring is not None and model[0].scoring.weights_only
