"""Coverage: the share of a training step's matrix products that the meter (so compute_reduction)
accounts for, counted once at setup with torch's FlopCounterMode; products of the model's own
(F.linear with a raw Parameter) and attention's Q·Kᵀ / weights·V are outside it, and a run whose
sampling reaches less than half of them says so."""

from __future__ import annotations

import logging

import pytest
import torch

from approxtrain.cli.console import plan_table
from approxtrain.coverage import plan_coverage, step_products
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import Trainer
from approxtrain.sampling import SamplingConfig
from approxtrain.surgery import approximate_, rules_from_dicts
from byo_nets import OwnProductNet

TOPK_HALF = SamplingConfig("topk", ratio=0.5)
OWN_PRODUCT_NET = ("model=custom", "model._target_=byo_nets.OwnProductNet", "+model.in_channels=${dataset_info:in_channels}",
                   "+model.num_classes=${dataset_info:num_classes}", "dataset=digits", "dataset.batch_size=200",
                   "trainer.max_steps=1", "layers=all")


def own_product_share(batch: int, width: int = 4, wide: int = 16, classes: int = 10, features: int = 64) -> float:
    """The hidden layer's share of OwnProductNet's step MACs, by hand: its forward and weight gradient
    (no input gradient: the first layer), against those plus the own product's three."""
    hidden = 2 * batch * features * width
    own = 3 * batch * width * classes * wide
    return hidden / (hidden + own)


def test_a_product_of_the_models_own_is_outside_the_coverage():
    torch.manual_seed(0)
    model, x = OwnProductNet(1, 10), torch.randn(3, 1, 8, 8)
    plan = approximate_(model, rules_from_dicts([{}], TOPK_HALF), example_input=x, batch_size=50)
    products = step_products(model, lambda m: m(x).sum())
    assert products.total == 2 * (2 * 3 * 64 * 4 + 3 * 3 * 4 * 160) and products.batched == 0
    assert plan_coverage(plan, products, example_batch=3) == pytest.approx(own_product_share(3))
    assert model.training and model.hidden.weight.grad is None  # side-effect free


def test_a_run_reports_coverage_and_warns_below_half(run_cfg, run_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="approxtrain"):
        Trainer(run_cfg(*OWN_PRODUCT_NET), run_dir).fit()
    results = read_results(run_dir)
    assert results["coverage"] == pytest.approx(own_product_share(2)) and results["compute_reduction"] > 0.4
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.startswith(f"coverage {own_product_share(2):.1%}: the layers surgery can sample compute ")
    assert "other products" in warning and "torch.nn.functional calls of the model's own" in warning and "\n" not in warning


def test_a_covered_run_has_coverage_one_and_no_warning(run_cfg, run_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="approxtrain"):
        Trainer(run_cfg("model=mlp", "dataset=digits", "dataset.batch_size=200", "trainer.max_steps=1"), run_dir).fit()
    assert read_results(run_dir)["coverage"] == pytest.approx(1.0)
    assert not [record for record in caplog.records if record.levelno == logging.WARNING]


def test_the_console_shows_coverage_next_to_the_reduction():
    model, x = OwnProductNet(1, 10), torch.randn(2, 1, 8, 8)
    plan = approximate_(model, rules_from_dicts([{}], TOPK_HALF), example_input=x)
    assert plan_table(plan, coverage=0.25).caption.endswith("(batch 2), coverage 25.0% of the step's products")


@pytest.mark.extra("models")
def test_gpt2_attention_products_are_the_uncovered_share():
    """GPT-2's Conv1D layers are metered (sampled as Linear layers); what stays out is attention's
    activation products, which torch runs in scaled_dot_product_attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    x = torch.randint(0, 50, (2, 8))
    plan = approximate_(model, rules_from_dicts([{"position": "first", "exact": True}, {"position": "last", "exact": True}, {}],
                                                TOPK_HALF), example_input=x)
    products = step_products(model, lambda m: m(x).logits.sum())
    share = plan_coverage(plan, products, example_batch=2)
    assert products.batched > 0 and share == pytest.approx(1 - products.batched / products.total)
    assert 0.9 < share < 1  # the Conv1D layers hold most of the products (without them: 0.3)
    assert sum(row.policy == "topk" for row in plan.rows) == 3  # c_proj, c_fc, mlp.c_proj; c_attn first, lm_head last
