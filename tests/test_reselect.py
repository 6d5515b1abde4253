"""``sampling.reselect_every``: a layer reuses its forward selection for N training calls, then
selects afresh; a new k selects afresh; 1 (the default) selects on every call; bad values are refused."""

from __future__ import annotations

import pytest
import torch

from approxtrain.config import ConfigError, default_sampling
from approxtrain.functional import PairScoring, pair_scores
from approxtrain.modules import ApproxConv2d, ApproxLinear
from approxtrain.sampling import SamplingConfig


def _kept_by(layer: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    layer.scoring = PairScoring(kept=[])
    for x in batches:
        layer(x).sum().backward()
    return layer.scoring.kept


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k).indices.sort().values


def test_linear_reuses_its_selection_for_reselect_every_calls() -> None:
    torch.manual_seed(0)
    layer = ApproxLinear(32, 8, sampling=SamplingConfig("topk", ratio=0.25, reselect_every=3))
    batches = [torch.randn(16, 32) * torch.rand(32) * 4 for _ in range(5)]
    kept = _kept_by(layer, batches)
    chosen = [_topk(pair_scores(x, 1, layer.weight.detach(), 1), 8) for x in batches]
    assert not torch.equal(chosen[0], chosen[1])  # the batches would select differently
    for call in range(5):
        assert torch.equal(kept[call], chosen[0 if call < 3 else 3]), call


def test_conv_reuses_its_selection_and_a_new_k_selects_afresh() -> None:
    torch.manual_seed(0)
    layer = ApproxConv2d(16, 4, 3, padding=1, sampling=SamplingConfig("topk", ratio=0.5, reselect_every=4))
    batches = [torch.randn(2, 16, 5, 5) * torch.rand(1, 16, 1, 1) * 4 for _ in range(3)]
    first = _kept_by(layer, batches[:2])
    assert torch.equal(first[0], first[1]) and first[0].numel() == 8
    layer.sampling = SamplingConfig("topk", ratio=0.25, reselect_every=4)  # a schedule's step: k changes
    (after,) = _kept_by(layer, batches[2:])
    assert torch.equal(after, _topk(pair_scores(batches[2], 1, layer.weight.detach(), 1), 4))


def test_random_policies_reuse_the_same_draw_and_gradients_stay_on_it() -> None:
    torch.manual_seed(0)
    layer = ApproxLinear(32, 8, sampling=SamplingConfig("nps", ratio=0.25, reselect_every=2))
    x = torch.randn(4, 32)
    kept = _kept_by(layer, [x, x])
    assert torch.equal(kept[0], kept[1])
    dropped = torch.ones(32, dtype=torch.bool).index_fill_(0, kept[0], False)
    assert layer.weight.grad[:, dropped].abs().sum() == 0 and layer.weight.grad[:, ~dropped].abs().sum() > 0


def test_every_call_selects_by_default() -> None:
    assert SamplingConfig().reselect_every == 1
    torch.manual_seed(0)
    layer = ApproxLinear(32, 8, sampling=SamplingConfig("topk", ratio=0.25))
    batches = [torch.randn(16, 32) * torch.rand(32) * 4 for _ in range(2)]
    kept = _kept_by(layer, batches)
    assert all(torch.equal(k, _topk(pair_scores(x, 1, layer.weight.detach(), 1), 8)) for k, x in zip(kept, batches))
    assert layer.kept_pairs.selection is None  # nothing is held


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_reselect_every_is_refused_by_name(value) -> None:
    with pytest.raises(ValueError, match="reselect_every"):
        SamplingConfig("topk", ratio=0.5, reselect_every=value)
    with pytest.raises(ConfigError, match=r"sampler\.reselect_every=.*allowed: an integer >= 1"):
        default_sampling({"sampler": {"name": "topk", "reselect_every": value}, "ratio": 0.5})
