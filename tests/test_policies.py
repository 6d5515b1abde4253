"""Sampler policies as registered classes: every policy's declared properties hold in its behaviour,
and a policy defined outside approxtrain (one class, one YAML; docs/samplers-and-layers.md) runs
through surgery, config and the CLI."""

from __future__ import annotations

import inspect
import itertools
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
from doc_sections import files_and_commands
from hydra.core.config_store import ConfigStore
from torch import nn

from approxtrain import policies
from approxtrain.accounting import ComputeMeter, counted_in_backward
from approxtrain.config import ConfigError, default_sampling, layer_rules, validate
from approxtrain.policies import SWITCHES, SamplerPolicy, get_policy, policy_names, register_policy
from approxtrain.run.schema import read_results
from approxtrain.run.trainer import train
from approxtrain.sampling import POLICIES, SamplingConfig, Selection, select
from approxtrain.sampling_fields import sampler_defaults
from approxtrain.surgery import LayerRule, approximate_, attach_meter
from conftest import FAST, compose_config, to_run_config


class Systematic(SamplerPolicy):
    """k evenly spaced pairs from a uniformly random start, scaled by n / k."""

    name = "systematic"
    random = True
    needs_scores = False
    switches = ("scale",)

    def unbiased(self, replacement, scale):
        return scale  # every pair is kept with probability k / n

    def select(self, scores, k, config, generator):
        n, device = scores.numel(), scores.device
        start = torch.randint(n, (1,), device=device, generator=generator)
        keep = ((start + torch.arange(k, device=device) * n // k) % n).sort().values
        return Selection(keep, torch.full((k,), n / k, device=device) if config.scale else None, True)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "samplers-and-layers.md"
ALL = (*POLICIES, Systematic.name)  # the built-ins and the one registered by the tests


@pytest.fixture(autouse=True)
def systematic_registered(monkeypatch):
    """The registry as it was, plus :class:`Systematic`; restored after the test."""
    monkeypatch.setattr(policies, "_POLICIES", dict(policies._POLICIES))
    register_policy(Systematic)


def switch_settings(name: str) -> list[dict[str, bool]]:
    """Every combination of the switches policy ``name`` reads."""
    read = Systematic.switches if name == Systematic.name else get_policy(name).switches
    return [dict(zip(read, values)) for values in itertools.product((False, True), repeat=len(read))]


def skewed_product(seed: int = 0, m: int = 6, n: int = 16, p: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (m, n), B (n, p) with widely spread pair norms, and their pair scores (float64)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=generator, dtype=torch.float64)
    a = a * torch.exp(1.5 * torch.randn(n, generator=generator, dtype=torch.float64))
    b = torch.randn(n, p, generator=generator, dtype=torch.float64)
    return a, b, torch.linalg.vector_norm(a, dim=0) * torch.linalg.vector_norm(b, dim=1)


def sampled_product(a: torch.Tensor, b: torch.Tensor, selection: Selection) -> torch.Tensor:
    a_k = a[:, selection.keep]
    if selection.scale is not None:
        a_k = a_k * selection.scale.to(a.dtype)
    return a_k @ b[selection.keep]


def same(one: Selection, two: Selection) -> bool:
    scales_equal = (one.scale is None) == (two.scale is None) and (one.scale is None or torch.equal(one.scale, two.scale))
    return one.keep.shape == two.keep.shape and torch.equal(one.keep, two.keep) and scales_equal


# --------------------------------------------------------------------------- the registry


def test_the_built_ins_are_registered_in_order_with_their_declarations():
    assert POLICIES == ("exact", "topk", "nps", "uniform", "bernoulli")
    assert policy_names() == (*POLICIES, "systematic")
    declared = {name: (p.random, p.fixed_k, p.compile_safe, p.needs_scores, p.samples, p.switches)
                for name, p in ((name, get_policy(name)) for name in POLICIES)}
    assert declared == {
        "exact": (False, True, True, False, False, ()),
        "topk": (False, True, True, True, True, ()),
        "nps": (True, True, True, True, True, ("replacement", "scale")),
        "uniform": (True, True, True, False, True, ("replacement", "scale")),
        "bernoulli": (True, False, False, True, True, ("scale",)),
    }


def test_a_config_holds_its_policy_object():
    config = SamplingConfig("systematic", ratio=0.5)
    assert config.sampler is get_policy("systematic") and config.is_random and not config.is_exact
    assert "sampler" not in config.to_dict() and SamplingConfig.from_dict(config.to_dict()) == config


def test_unknown_names_list_every_registered_policy():
    with pytest.raises(ValueError, match=f"^unknown sampler policy 'nope'; allowed: {', '.join(policy_names())}$"):
        SamplingConfig("nope")
    with pytest.raises(ConfigError, match=f"^sampler='nope' is unknown; allowed: {', '.join(policy_names())}$"):
        default_sampling({"sampler": {"name": "nope", **sampler_defaults()}, "ratio": 0.5})
    assert "systematic" in policy_names()


def test_replacement_is_refused_where_the_policy_does_not_read_it():
    with pytest.raises(ValueError, match="^replacement=true is invalid for policy 'systematic'; allowed with: nps, uniform$"):
        SamplingConfig("systematic", replacement=True)
    SamplingConfig("exact", replacement=True)  # exact samples nothing: every switch is moot (a sweep may set one)


def test_a_declaration_that_cannot_work_is_refused_naming_the_property():
    class NoName(Systematic):
        name = "no name"

    class NotAFlag(Systematic):
        name = "not_a_flag"
        random = "yes"

    class UnknownSwitch(Systematic):
        name = "unknown_switch"
        switches = ("temperature",)

    class NoSelect(SamplerPolicy):
        name = "no_select"
        random = False

    class Other(Systematic):  # a second class under a taken name
        pass

    for cls, message in ((NoName, "name='no name' is invalid"), (NotAFlag, "random='yes' is invalid"),
                         (UnknownSwitch, "switches=('temperature',) is invalid"), (NoSelect, "does not implement select"),
                         (Other, "'systematic' is already registered by test_policies.Systematic"), (int, "a subclass of")):
        with pytest.raises((TypeError, ValueError), match=re.escape(message)):
            register_policy(cls)
    register_policy(Systematic)  # the same class again (a reloaded module): fine


# --------------------------------------------------------------------------- declared = observed


@pytest.mark.parametrize("name", ALL)
def test_random_or_deterministic_as_declared(name):
    _, _, scores = skewed_product()
    config = SamplingConfig(name)

    def draws(seed: int) -> list[Selection]:
        generator = torch.Generator().manual_seed(seed)
        return [select(scores, 6, config, generator) for _ in range(4)]

    first, again, other = draws(1), draws(1), draws(2)
    assert all(same(one, two) for one, two in zip(first, again))  # a seed always gives the same draws
    deterministic = all(same(one, two) for one, two in zip(first + first, other + first[1:] + first[:1]))
    assert deterministic == (not config.sampler.random)


@pytest.mark.parametrize("name", ALL)
def test_fixed_k_as_declared(name):
    _, _, scores = skewed_product()
    generator, config = torch.Generator().manual_seed(0), SamplingConfig(name)
    counts = torch.tensor([float(select(scores, k, config, generator).keep.numel()) for k in (3, 8) for _ in range(200)])
    if not config.sampler.samples:
        assert (counts == scores.numel()).all()
    elif config.sampler.fixed_k:
        assert counts.tolist() == [3.0] * 200 + [8.0] * 200
    else:  # a random number of pairs, k on average
        assert counts.std() > 0 and counts[:200].mean() == pytest.approx(3, abs=0.5) and counts[200:].mean() == pytest.approx(8, abs=0.5)
    assert counted_in_backward(SamplingConfig(name, bwd_ratio=0.5), "input_grad") == (config.sampler.samples and not config.sampler.fixed_k)


@pytest.mark.parametrize("name", ALL)
def test_needs_scores_as_declared(name):
    _, _, scores = skewed_product()
    config = SamplingConfig(name)
    selections = [select(other, 6, config, torch.Generator().manual_seed(3)) for other in (scores, scores.flip(0), scores.sqrt())]
    assert all(same(selections[0], selection) for selection in selections[1:]) == (not config.sampler.needs_scores)


@pytest.mark.parametrize("name", ALL)
def test_switches_not_read_change_nothing(name):
    _, _, scores = skewed_product()
    policy = get_policy(name)
    for switch in SWITCHES:
        settings = [{switch: value} for value in (False, True)]
        if switch == "replacement" and policy.samples and "replacement" not in policy.switches:
            continue  # refused (test_replacement_is_refused_where_the_policy_does_not_read_it)
        selections = [select(scores, 6, SamplingConfig(name, **setting), torch.Generator().manual_seed(3)) for setting in settings]
        assert same(*selections) == (switch not in policy.switches), switch


@pytest.mark.parametrize("name", ALL)
def test_compile_safe_as_declared(name):
    _, _, scores = skewed_product()
    config = SamplingConfig(name)
    dynamo.reset()
    explanation = dynamo.explain(lambda s: select(s, 6, config).keep)(scores.float())
    assert (explanation.graph_break_count == 0) == config.sampler.compile_safe, [str(b.reason) for b in explanation.break_reasons]


UNBIASED_DRAWS = 6000


@pytest.mark.parametrize(("name", "switches"), [(name, setting) for name in ALL for setting in switch_settings(name)],
                         ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()) or "none")
def test_unbiased_as_declared(name, switches, one_thread):
    """Declared unbiased: the Monte-Carlo mean of the sampled product is the exact product (every
    entry within 4.5 standard errors); declared biased: some entry is off by more than 8."""
    a, b, scores = skewed_product()
    exact = a @ b
    config = SamplingConfig(name, **switches)
    unbiased = config.sampler.unbiased(switches.get("replacement", False), switches.get("scale", True))
    generator = torch.Generator().manual_seed(0)
    draws = 1 if not config.sampler.random else UNBIASED_DRAWS
    estimates = torch.stack([sampled_product(a, b, select(scores, 5, config, generator)) for _ in range(draws)])
    if not config.sampler.random:  # one draw is the expectation
        assert torch.allclose(estimates[0], exact) == unbiased
        return
    z = (estimates.mean(0) - exact) / (estimates.std(0) / math.sqrt(draws))
    if unbiased:
        assert z.abs().max() < 4.5, z
    else:
        assert z.abs().max() > 8, z


# --------------------------------------------------------------------------- a new policy, used everywhere


def test_a_registered_policy_trains_through_surgery():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = approximate_(model, [LayerRule(match="0", sampling=SamplingConfig("systematic", ratio=0.25))],
                        generator=torch.Generator().manual_seed(0), example_input=torch.zeros(2, 12), batch_size=4)
    assert [(row.name, row.policy, row.n, row.k) for row in plan.rows] == [("0", "systematic", 12, 3), ("2", "exact", 8, 8)]
    assert "sampler=systematic, ratio=0.25, k=3/12, scale=True" in repr(model[0])
    meter = ComputeMeter()
    attach_meter(model, meter)
    model(torch.randn(4, 12)).sum().backward()
    kept = model[0].weight.grad.abs().sum(0).nonzero().squeeze(1)
    assert kept.numel() == 3 and set(torch.diff(kept).tolist()) <= {4, 5, 6, 7, 8}  # evenly spaced, 12 / 3 apart (mod 12)
    assert meter.compute_reduction == pytest.approx(plan.compute_reduction)


@pytest.fixture
def sampler_option():
    """Factory: ``sampler=<option>`` from a ConfigStore node written as a ``configs/sampler/*.yaml`` is;
    removed after the test."""
    stored = []

    def store(option: str, **fields) -> None:
        ConfigStore.instance().store(group="sampler", name=option, node={"defaults": ["/sampler_fields@_here_", "_self_"], **fields})
        stored.append(f"{option}.yaml")

    yield store
    for option in stored:
        ConfigStore.instance().repo["sampler"].pop(option)


def test_a_registered_policy_runs_through_config(sampler_option, run_dir):
    sampler_option("systematic_half", name="systematic")
    cfg = to_run_config(compose_config(*FAST, "model=mlp", "dataset=digits", "sampler=systematic_half", "ratio=0.5",
                                       "trainer.max_steps=3"))
    validate(cfg)
    assert {rule.sampling.policy for rule in layer_rules(cfg)} == {"systematic"}
    results = train(cfg, run_dir)
    assert results["status"] == "finished" and results["sampler"] == "systematic" and results["steps"] == 3
    assert {row["policy"] for row in results["layers"] if row["rule"] is not None} == {"systematic"}
    assert results["compute_reduction"] == pytest.approx(results["planned_compute_reduction"], abs=1e-9)


def docs_section() -> tuple[dict[str, str], str]:
    """The files (path from each block's first-line comment -> text) and the command of the docs' "Adding a sampler policy"."""
    files, commands = files_and_commands(DOCS, "Adding a sampler policy")
    assert len(commands) == 1 and len(files) == 2, "the section shows one module, one YAML and one command"
    return files, commands[0]


def test_the_docs_policy_is_the_one_tested_here():
    files, _ = docs_section()
    assert inspect.getsource(Systematic) in files["my_policies.py"]


@pytest.mark.slow
def test_the_docs_policy_trains_through_the_cli(cli, tmp_path):
    """A user's policy as the docs show it: one class in their module, one YAML naming it and the module."""
    files, command = docs_section()
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    words = shlex.split(command)
    assert words[0] == "PYTHONPATH=." and words[1] == "approxtrain"
    environment = {"PYTHONPATH": str(tmp_path)}
    run_dir = tmp_path / "run"
    process = cli(*words[2:], "model=mlp", "dataset=digits", *FAST, "trainer.max_steps=2", f"hydra.run.dir={run_dir}", env=environment)
    assert process.returncode == 0, process.stderr
    results = read_results(run_dir)
    assert results["status"] == "finished" and {row["policy"] for row in results["layers"] if row["rule"] is not None} == {"systematic"}
    bad = cli(*words[2:], "sampler.module=nowhere", "model=mlp", "dataset=digits", *FAST, f"hydra.run.dir={tmp_path / 'bad'}",
              env=environment)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("approxtrain: error: sampler.module='nowhere' cannot be imported")
