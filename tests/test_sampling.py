"""Samplers: configuration checks, the policies' statistics (unbiasedness, Bernoulli
probabilities) and the orderings of Adelman & Silberstein (2018), Fig. 1."""

from __future__ import annotations

import math

import pytest
import torch

from approxtrain.sampling import (
    POLICIES,
    SamplingConfig,
    Selection,
    bernoulli_probabilities,
    norm_probabilities,
    num_kept,
    select,
)


def pair_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-row pair scores ``|A^(i)| |B_(i)|``."""
    return torch.linalg.vector_norm(a, dim=0) * torch.linalg.vector_norm(b, dim=1)


def crs_product(a: torch.Tensor, b: torch.Tensor, k: int, config: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``A~ D B~`` (Eq. 1) through :func:`select`."""
    selection = select(pair_scores(a, b), k, config, generator)
    a_k = a[:, selection.keep]
    if selection.scale is not None:
        a_k = a_k * selection.scale.to(a.dtype)
    return a_k @ b[selection.keep]


def mean_z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per-entry z-scores of the Monte-Carlo mean of ``estimates`` (T, *shape) against ``exact``."""
    draws = estimates.shape[0]
    mean = estimates.mean(0)
    standard_error = estimates.std(0) / math.sqrt(draws)
    return (mean - exact) / standard_error


def skewed_matrices(seed: int = 0, m: int = 8, n: int = 24, p: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m, n) and B (n, p) whose column-row pairs have widely spread norms."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=generator, dtype=torch.float64)
    b = torch.randn(n, p, generator=generator, dtype=torch.float64)
    spread = torch.exp(1.5 * torch.randn(n, generator=generator, dtype=torch.float64))
    return a * spread, b


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "abc", None, True])
def test_bad_ratio_is_a_one_line_value_error_naming_it(ratio):
    with pytest.raises(ValueError) as error:
        SamplingConfig("topk", ratio=ratio)
    message = str(error.value)
    assert "\n" not in message
    assert f"ratio={ratio!r}" in message or f"ratio={float(ratio)}" in message
    assert "(0, 1]" in message


@pytest.mark.parametrize("name", ["bwd_ratio", "wu_ratio"])
def test_bad_backward_ratios_are_rejected(name):
    with pytest.raises(ValueError, match=f"{name}=1.5"):
        SamplingConfig("topk", **{name: 1.5})


def test_unknown_policy_is_rejected_listing_the_allowed_ones():
    with pytest.raises(ValueError) as error:
        SamplingConfig("top-k", ratio=0.5)
    message = str(error.value)
    assert "'top-k'" in message and "\n" not in message
    for policy in POLICIES:
        assert policy in message


@pytest.mark.parametrize("name", ["min_k", "bwd_min_k", "wu_min_k", "align_k"])
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_bad_counts_are_rejected(name, value):
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        SamplingConfig("topk", ratio=0.5, **{name: value})


@pytest.mark.parametrize("policy", ["topk", "bernoulli"])
def test_replacement_is_only_for_nps_and_uniform(policy):
    with pytest.raises(ValueError, match=f"replacement=true is invalid for policy '{policy}'"):
        SamplingConfig(policy, ratio=0.5, replacement=True)
    SamplingConfig("nps", ratio=0.5, replacement=True)
    SamplingConfig("uniform", ratio=0.5, replacement=True)


@pytest.mark.parametrize("name", ["replacement", "scale"])
def test_switches_must_be_booleans(name):
    with pytest.raises(ValueError, match=f"{name}='yes'"):
        SamplingConfig("nps", ratio=0.5, **{name: "yes"})


def test_from_dict_rejects_unknown_keys_by_name_and_round_trips():
    with pytest.raises(ValueError, match="unknown sampling option\\(s\\) ratoi"):
        SamplingConfig.from_dict({"policy": "topk", "ratoi": 0.5})
    config = SamplingConfig("nps", ratio=0.3, replacement=True, bwd_ratio=0.5, wu_min_k=4)
    assert SamplingConfig.from_dict(config.to_dict()) == config


def test_config_k_rounds_half_up_and_respects_min_k_and_exact():
    assert SamplingConfig("topk", ratio=0.4).k(784) == 314  # 313.6
    assert SamplingConfig("topk", ratio=0.5).k(3) == 2  # 1.5 rounds up
    assert SamplingConfig("topk", ratio=0.3).k(32) == 10  # 9.6
    assert SamplingConfig("topk", ratio=0.01, min_k=5).k(100) == 5
    assert SamplingConfig("topk", ratio=0.01, min_k=500).k(100) == 100
    assert SamplingConfig("exact", ratio=0.1).k(100) == 100
    config = SamplingConfig("topk", ratio=0.4, bwd_ratio=0.05, bwd_min_k=10, wu_ratio=0.05, wu_min_k=10)
    assert config.bwd_k(500) == 25 and config.bwd_k(10) == 10 and config.wu_k(50) == 10
    assert config.samples_backward and not SamplingConfig("topk", ratio=0.4).samples_backward
    assert not SamplingConfig("exact", bwd_ratio=0.5).samples_backward


def test_num_kept():
    assert num_kept(10, 0.25) == 3  # 2.5 rounds half up
    assert num_kept(10, 0.24) == 2
    assert num_kept(10, 0.01) == 1
    assert num_kept(10, 0.01, min_k=4) == 4
    assert num_kept(100, 0.3, align_k=8) == 32
    assert num_kept(10, 0.5, align_k=8) == 8
    assert num_kept(10, 0.9, align_k=8) == 10  # never more than n
    assert num_kept(10, 1.0) == 10


def test_random_property():
    assert [SamplingConfig(policy).is_random for policy in POLICIES] == [False, False, True, True, True]


# --------------------------------------------------------------------------- select


def test_topk_keeps_the_largest_scores_without_scale():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0])
    selection = select(scores, 3, SamplingConfig("topk", ratio=0.5))
    assert isinstance(selection, Selection)
    assert sorted(selection.keep.tolist()) == [1, 3, 5]
    assert selection.scale is None and selection.unique


@pytest.mark.parametrize("config", [SamplingConfig("exact"), SamplingConfig("topk"), SamplingConfig("nps"),
                                    SamplingConfig("uniform")])
def test_k_equal_n_without_replacement_keeps_everything_unscaled(config):
    scores = torch.rand(7)
    selection = select(scores, 7, config, torch.Generator().manual_seed(0))
    assert selection.keep.tolist() == list(range(7))
    assert selection.scale is None and selection.unique


@pytest.mark.parametrize("config", [
    SamplingConfig("nps", replacement=False, scale=True),
    SamplingConfig("nps", replacement=True, scale=True),
    SamplingConfig("nps", replacement=False, scale=False),
    SamplingConfig("uniform", replacement=False, scale=True),
    SamplingConfig("uniform", replacement=True, scale=False),
])
def test_random_selection_shapes_and_scales(config):
    scores = torch.rand(50) + 0.1
    generator = torch.Generator().manual_seed(0)
    selection = select(scores, 20, config, generator)
    assert selection.keep.shape == (20,) and selection.keep.dtype == torch.int64
    assert 0 <= selection.keep.min() and selection.keep.max() < 50
    assert selection.unique == (not config.replacement)
    if not config.replacement:
        assert selection.keep.unique().numel() == 20
    if not config.scale:
        assert selection.scale is None
    elif config.policy == "uniform":
        assert torch.allclose(selection.scale, torch.full((20,), 50 / 20))
    else:
        p = norm_probabilities(scores)
        assert torch.allclose(selection.scale, 1 / (20 * p[selection.keep]))


def test_norm_probabilities_are_proportional_floored_and_uniform_for_zero_scores():
    p = norm_probabilities(torch.tensor([1.0, 3.0, 0.0, 4.0]))
    assert torch.isclose(p.sum(), torch.tensor(1.0))
    assert torch.allclose(p, torch.tensor([1 / 8, 3 / 8, 0.0, 4 / 8]), atol=1e-6)
    assert p[2] > 0  # floored: every pair stays possible
    assert torch.allclose(norm_probabilities(torch.zeros(5)), torch.full((5,), 0.2))


@pytest.mark.parametrize("config", [SamplingConfig("nps"), SamplingConfig("nps", replacement=True),
                                    SamplingConfig("uniform"), SamplingConfig("uniform", replacement=True),
                                    SamplingConfig("bernoulli")])
def test_same_seed_same_samples_different_seed_different_samples(config):
    scores = torch.rand(200) + 0.05

    def draws(seed: int) -> list[Selection]:
        generator = torch.Generator().manual_seed(seed)
        return [select(scores, 60, config, generator) for _ in range(3)]

    first, again, other = draws(1), draws(1), draws(2)
    for one, two in zip(first, again):
        assert torch.equal(one.keep, two.keep)
        assert (one.scale is None and two.scale is None) or torch.equal(one.scale, two.scale)
    assert any(not torch.equal(one.keep, two.keep) for one, two in zip(first, other))
    # successive draws from one generator differ too
    assert not torch.equal(first[0].keep, first[1].keep)


def test_generator_on_another_device_type_is_rejected():
    # scores on the meta device stand in for a layer on an accelerator (no data is touched)
    for policy in ("nps", "uniform", "bernoulli"):
        with pytest.raises(ValueError, match="generator is on cpu but the layer runs on meta; allowed: "
                                             "a torch.Generator\\(device='meta'\\) or None"):
            select(torch.rand(10, device="meta"), 3, SamplingConfig(policy), torch.Generator())
    # deterministic policies take no randomness and need no check
    assert select(torch.rand(10), 3, SamplingConfig("topk"), torch.Generator()).keep.numel() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put the generator on")
def test_generator_on_the_wrong_device_is_rejected_on_cuda():  # pragma: no cover - CPU-only here
    with pytest.raises(ValueError, match="generator is on cuda but the layer runs on cpu"):
        select(torch.rand(10), 3, SamplingConfig("nps"), torch.Generator(device="cuda"))
    with pytest.raises(ValueError, match="generator is on cpu but the layer runs on cuda"):
        select(torch.rand(10, device="cuda"), 3, SamplingConfig("nps"), torch.Generator())


# --------------------------------------------------------------------------- Bernoulli


def test_bernoulli_probabilities_sum_to_k_and_lie_in_unit_interval():
    generator = torch.Generator().manual_seed(0)
    for k in (1, 5, 17, 40):
        scores = torch.rand(50, generator=generator) ** 3
        q = bernoulli_probabilities(scores, k)
        assert q.shape == (50,)
        assert torch.isclose(q.sum(), torch.tensor(float(k)), rtol=1e-5)
        assert q.min() >= 0 and q.max() <= 1
    assert torch.equal(bernoulli_probabilities(torch.rand(10), 10), torch.ones(10))


def test_bernoulli_uncapped_probabilities_are_k_times_norm_probabilities():
    scores = torch.linspace(1.0, 2.0, 20)
    q = bernoulli_probabilities(scores, 4)
    assert torch.allclose(q, 4 * norm_probabilities(scores), rtol=1e-5)


def test_bernoulli_redistributes_the_capped_mass():
    # Two dominant pairs are kept surely (q = 1); the remaining k - 2 = 3 are spread
    # over the 18 equal pairs in proportion to their scores.
    scores = torch.tensor([1000.0, 500.0] + [1.0] * 18)
    q = bernoulli_probabilities(scores, 5)
    assert torch.allclose(q[:2], torch.ones(2))
    assert torch.allclose(q[2:], torch.full((18,), 3 / 18), rtol=1e-4)
    assert torch.isclose(q.sum(), torch.tensor(5.0), rtol=1e-5)
    # the order of the scores does not matter
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(bernoulli_probabilities(scores[order], 5), q[order])


def test_bernoulli_cascading_caps():
    # capping the first pair pushes the second over 1 as well
    scores = torch.tensor([10.0, 6.0, 1.0, 1.0, 1.0, 1.0])
    q = bernoulli_probabilities(scores, 3)
    assert torch.allclose(q, torch.tensor([1.0, 1.0, 0.25, 0.25, 0.25, 0.25]), rtol=1e-5)


def test_bernoulli_number_kept_varies_around_k(one_thread):
    scores = torch.rand(100, generator=torch.Generator().manual_seed(0)) + 0.01
    k = 30
    q = bernoulli_probabilities(scores, k)
    generator = torch.Generator().manual_seed(1)
    draws = 2000
    counts = torch.tensor([float(select(scores, k, SamplingConfig("bernoulli"), generator).keep.numel())
                           for _ in range(draws)])
    expected_std = math.sqrt(float((q * (1 - q)).sum()))
    assert counts.std() > 1.0  # the count really varies
    assert abs(counts.std().item() - expected_std) < 0.2 * expected_std
    assert abs(counts.mean().item() - k) < 5 * expected_std / math.sqrt(draws)


def test_bernoulli_selection_scales_by_inverse_probability():
    scores = torch.rand(40, generator=torch.Generator().manual_seed(0)) + 0.01
    # (the draw's seed differs from the scores': with the same one every draw lies above its q)
    selection = select(scores, 10, SamplingConfig("bernoulli"), torch.Generator().manual_seed(1))
    q = bernoulli_probabilities(scores, 10)
    assert selection.keep.numel() > 1 and selection.unique and selection.keep.unique().numel() == selection.keep.numel()
    assert torch.allclose(selection.scale, 1 / q[selection.keep])


# --------------------------------------------------------------------------- unbiasedness

UNBIASED = {
    "nps-replacement-scale": SamplingConfig("nps", replacement=True, scale=True),
    "uniform-replacement-scale": SamplingConfig("uniform", replacement=True, scale=True),
    "uniform-no-replacement-scale": SamplingConfig("uniform", replacement=False, scale=True),
    "bernoulli": SamplingConfig("bernoulli"),
}


@pytest.mark.parametrize("name", list(UNBIASED))
def test_scaled_estimators_are_unbiased(name, one_thread):
    a, b = skewed_matrices(seed=0)
    exact = a @ b
    generator = torch.Generator().manual_seed(11)
    draws = 4000
    estimates = torch.stack([crs_product(a, b, 6, UNBIASED[name], generator) for _ in range(draws)])
    z = mean_z_scores(estimates, exact)
    # 48 entries, fixed seed; |z| < 4.5 has probability > 0.9997 under an unbiased estimator.
    assert z.abs().max() < 4.5, f"{name}: max |z| = {z.abs().max():.2f}"
    # jointly: the mean's distance from AB is of the order of its standard error (chi-square, 48 dof)
    standard_error = estimates.std(0) / math.sqrt(draws)
    assert (estimates.mean(0) - exact).norm() < 2 * standard_error.norm()


def test_unbiased_mean_error_shrinks_like_one_over_sqrt_draws(one_thread):
    a, b = skewed_matrices(seed=1)
    exact = a @ b
    generator = torch.Generator().manual_seed(5)
    config = UNBIASED["nps-replacement-scale"]
    estimates = torch.stack([crs_product(a, b, 6, config, generator) for _ in range(6400)])

    def error(draws: int) -> float:  # average over disjoint batches of `draws` estimates
        batches = estimates[: 6400 // draws * draws].reshape(-1, draws, *exact.shape).mean(1)
        return float(((batches - exact) ** 2).sum((1, 2)).mean().sqrt() / exact.norm())

    # 16x the draws: the root-mean-square error of the mean shrinks by ~4x.
    assert 3.0 < error(25) / error(400) < 5.3


def test_topk_is_biased():
    a, b = skewed_matrices(seed=0)
    exact = a @ b
    config = SamplingConfig("topk")
    estimate = crs_product(a, b, 6, config)
    assert torch.equal(estimate, crs_product(a, b, 6, config))  # deterministic: its mean is itself
    assert (estimate - exact).norm() / exact.norm() > 0.05


def test_nps_without_replacement_but_with_scale_is_biased_for_skewed_scores(one_thread):
    # One dominant pair is (almost) always drawn but scaled by 1/(k p) < 1: the mean misses part of it.
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    b = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    a[:, 0] *= 30.0
    exact = a @ b
    config = SamplingConfig("nps", replacement=False, scale=True)
    draws = 2000
    estimates = torch.stack([crs_product(a, b, 5, config, generator) for _ in range(draws)])
    z = mean_z_scores(estimates, exact)
    assert z.abs().max() > 20
    assert (estimates.mean(0) - exact).norm() / exact.norm() > 0.2
    # the same skewed product is estimated without bias with replacement
    unbiased = torch.stack([crs_product(a, b, 5, UNBIASED["nps-replacement-scale"], generator) for _ in range(draws)])
    assert mean_z_scores(unbiased, exact).abs().max() < 4.5


# --------------------------------------------------------------------------- Fig. 1

FIG1_VARIANTS = {
    "topk": SamplingConfig("topk"),
    "nps-replacement-scale": SamplingConfig("nps", replacement=True, scale=True),
    "nps-no-replacement-no-scale": SamplingConfig("nps", replacement=False, scale=False),
    "uniform-replacement-scale": SamplingConfig("uniform", replacement=True, scale=True),
    "uniform-no-replacement-scale": SamplingConfig("uniform", replacement=False, scale=True),
    "uniform-no-replacement-no-scale": SamplingConfig("uniform", replacement=False, scale=False),
}
FIG1_RATIOS = (0.2, 0.4, 0.6, 0.8)


@pytest.fixture(scope="module")
def fig1_errors():
    """Mean of ``|AB - A~DB~|_F / (|A|_F |B|_F)`` over 100 draws, 100x100 N(0, 1) matrices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(100, 100, generator=generator)
        b = torch.randn(100, 100, generator=generator)
        exact = a @ b
        norm = a.norm() * b.norm()
        errors: dict[tuple[str, float], float] = {}
        for ratio in FIG1_RATIOS:
            k = num_kept(100, ratio)
            for name, config in FIG1_VARIANTS.items():
                draw_generator = torch.Generator().manual_seed(1)
                draws = 1 if name == "topk" else 100
                total = sum(float((exact - crs_product(a, b, k, config, draw_generator)).norm() / norm)
                            for _ in range(draws))
                errors[name, ratio] = total / draws
        return errors
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ratio", FIG1_RATIOS)
def test_fig1_without_replacement_beats_with_replacement(fig1_errors, ratio):
    e = {name: fig1_errors[name, ratio] for name in FIG1_VARIANTS}
    assert e["uniform-no-replacement-scale"] < 0.95 * e["uniform-replacement-scale"]
    assert e["nps-no-replacement-no-scale"] < 0.95 * e["nps-replacement-scale"]


@pytest.mark.parametrize("ratio", FIG1_RATIOS)
def test_fig1_topk_is_close_to_nps_without_replacement_and_scale(fig1_errors, ratio):
    e = {name: fig1_errors[name, ratio] for name in FIG1_VARIANTS}
    gap = abs(e["topk"] - e["nps-no-replacement-no-scale"])
    assert gap < 0.2 * e["nps-no-replacement-no-scale"]
    # much closer to each other than to the sampled-and-scaled estimators
    assert gap < 0.25 * (e["nps-replacement-scale"] - e["nps-no-replacement-no-scale"])
    assert gap < 0.25 * (e["uniform-replacement-scale"] - e["nps-no-replacement-no-scale"])


@pytest.mark.parametrize("ratio", FIG1_RATIOS)
def test_fig1_unscaled_beats_scaled_for_zero_mean_entries(fig1_errors, ratio):
    e = {name: fig1_errors[name, ratio] for name in FIG1_VARIANTS}
    assert e["uniform-no-replacement-no-scale"] < 0.95 * e["uniform-no-replacement-scale"]
    assert e["nps-no-replacement-no-scale"] < 0.95 * e["nps-replacement-scale"]
    assert e["topk"] < 0.95 * e["uniform-no-replacement-scale"]


def test_fig1_error_falls_with_the_ratio(fig1_errors):
    for name in FIG1_VARIANTS:
        errors = [fig1_errors[name, ratio] for ratio in FIG1_RATIOS]
        assert errors == sorted(errors, reverse=True), name
