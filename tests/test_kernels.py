"""The Triton kernels (approxtrain.kernels) give the torch path's values: each op alone, and the
approximate linear / conv2d end to end with the triton backend against the torch backend. On a
CPU they run under Triton's interpreter (TRITON_INTERPRET=1, small shapes); on CUDA compiled."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton reads TRITON_INTERPRET when it is imported (torch imports it early): on a CPU these tests
# run in a process started with it, by tests/test_kernels_interpreted.py.
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="needs CUDA, or TRITON_INTERPRET=1 from the start (test_kernels_interpreted.py)")

from approxtrain import SamplingConfig, approx_conv2d, approx_linear, kernels  # noqa: E402 - after the skip's reason
from approxtrain.modules import _store_column_major_  # noqa: E402 - after the skip's reason
from approxtrain.policies import get_policy  # noqa: E402 - after the skip's reason


@pytest.fixture
def triton_backend():
    before = kernels.backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(before)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(0, 5), (1, 5), (37, 23), (200, 70)])
def test_column_sq_sums(rows, cols, dtype):
    x = randn(rows, cols, dtype=dtype)
    torch.testing.assert_close(kernels.column_sq_sums(x), x.float().square().sum(0), rtol=1e-5, atol=1e-5)


def test_topk_indices_are_torch_topk_ascending_with_ties_to_the_lower_index():
    for n, k in ((50, 17), (130, 1), (130, 129), (7, 7)):
        scores = torch.rand(n, generator=torch.Generator().manual_seed(n)).to(DEVICE)
        assert torch.equal(kernels.topk_indices(scores, k), torch.topk(scores, k).indices.sort().values)
    tied = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, float("nan")], device=DEVICE)
    assert kernels.topk_indices(tied, 3).tolist() == [1, 2, 5]


def test_the_topk_policy_selects_by_the_kernel_where_it_serves(triton_backend, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "topk_indices", lambda scores, k: calls.append(k) or torch.topk(scores, k).indices.sort().values)
    scores = torch.rand(50, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    topk = get_policy("topk")
    topk.select(scores, 17, SamplingConfig("topk", ratio=0.34), None)
    topk.select(scores, 50, SamplingConfig("topk", ratio=1.0), None)  # k = n: nothing to select, torch's path
    assert calls == [17]


def test_take_and_spread_columns():
    x = randn(37, 23)
    keep = torch.tensor([1, 4, 5, 9, 22], device=DEVICE)
    assert torch.equal(kernels.take_columns(x, keep), x[:, keep])
    assert torch.equal(kernels.take_columns(x[:, :20], keep[:4]), x[:, :20][:, keep[:4]])  # a strided view
    g = randn(37, 5, seed=1)
    spread = torch.zeros(37, 23, device=DEVICE)
    spread[:, keep] = g
    assert torch.equal(kernels.spread_columns(g, keep, 23), spread)


@pytest.mark.parametrize("scaled", [False, True])
def test_gather_mm_in_its_three_uses(scaled):
    x, w, dy = randn(37, 40), randn(19, 40, seed=1), randn(37, 19, seed=2)
    keep = torch.tensor([0, 3, 4, 8, 15, 16, 17, 30, 39], device=DEVICE)
    scale = torch.rand(9, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5 if scaled else None
    d = scale if scaled else torch.ones(9, device=DEVICE)
    x_k, w_kd = x[:, keep], w[:, keep] * d
    close = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(kernels.gather_mm(x_k, w.t(), keep, scale, 1, False, True, 37, 19), x_k @ w_kd.t(), **close)
    torch.testing.assert_close(kernels.gather_mm(x, w.t(), keep, scale, 1, True, True, 37, 19), x_k @ w_kd.t(), **close)
    grad_input = torch.zeros(37, 40, device=DEVICE)
    grad_input[:, keep] = dy @ w_kd
    torch.testing.assert_close(kernels.gather_mm(dy, w, keep, scale, 2, False, True, 37, 40), grad_input, **close)
    grad_weight = torch.zeros(19, 40, device=DEVICE)
    grad_weight[:, keep] = (dy.t() @ x_k) * d
    torch.testing.assert_close(kernels.gather_mm(dy.t(), x_k, keep, scale, 2, False, False, 19, 40), grad_weight, **close)
    torch.testing.assert_close(kernels.gather_mm(x_k.t(), dy, keep, scale, 0, False, False, 40, 19).t(), grad_weight,
                               **close)


def test_gather_mm_multiplies_fp32_as_torch_does():
    # Triton's tl.dot would run fp32 operands as TF32; torch's matmuls do not unless told to (the
    # fp32 comparisons above, at 1e-4, fail under TF32 on a GPU)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert kernels._fp32_dot_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kernels._fp32_dot_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def _linear_step(config, column_major, seed=0):
    x = (randn(24, 48, seed=seed) * torch.linspace(0.2, 3, 48, device=DEVICE)).requires_grad_()
    w = torch.nn.Parameter(randn(20, 48, seed=seed + 1) / 7)
    if column_major:
        _store_column_major_(w)
    b = torch.nn.Parameter(randn(20, seed=seed + 2))
    y = approx_linear(x, w, b, config, torch.Generator(device=DEVICE).manual_seed(seed))
    y.backward(randn(24, 20, seed=seed + 3))
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("column_major", [True, False], ids=["column_major", "row_major"])
@pytest.mark.parametrize("config", [SamplingConfig("topk", ratio=0.5), SamplingConfig("nps", ratio=0.4),
                                    SamplingConfig("uniform", ratio=0.3, replacement=True),
                                    SamplingConfig("topk", ratio=0.5, wu_ratio=0.5)], ids=["topk", "nps", "repl", "wu"])
def test_approx_linear_with_triton_kernels_equals_the_torch_path(config, column_major, triton_backend):
    fused = _linear_step(config, column_major)
    kernels.set_backend("torch")
    plain = _linear_step(config, column_major)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_approx_conv2d_with_triton_kernels_equals_the_torch_path(memory_format, triton_backend):
    def step():
        x = (randn(2, 12, 5, 5) * torch.linspace(0.2, 3, 12, device=DEVICE).view(1, -1, 1, 1))
        x = x.contiguous(memory_format=memory_format).requires_grad_()
        w = torch.nn.Parameter(randn(6, 12, 3, 3, seed=1).contiguous(memory_format=memory_format) / 5)
        y = approx_conv2d(x, w, None, 1, 1, 1, SamplingConfig("topk", ratio=0.5))
        y.backward(randn(*y.shape, seed=2).contiguous(memory_format=memory_format))
        return y, x.grad, w.grad

    fused = step()
    kernels.set_backend("torch")
    for a, b in zip(fused, step()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["cuda", "torch:topk", "triton:", "triton:scores,", "triton:topk,nope"])
def test_bad_backend_is_refused_by_name(name):
    before = kernels.backend()
    with pytest.raises(ValueError) as error:
        kernels.set_backend(name)
    assert str(error.value) == (f"kernel backend {name!r} is invalid; allowed: torch, triton, triton:<pieces> with pieces "
                                f"from {', '.join(kernels.PIECES)}")
    assert kernels.backend() == before


PIECE_OPS = {"scores": {"column_sq_sums"}, "topk": {"topk_indices"}, "columns": {"take_columns", "spread_columns"},
             "linear": {"gather_mm"}}


class KernelOps(TorchDispatchMode):
    """The approxtrain kernels dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "approxtrain":
            self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("piece", kernels.PIECES)
def test_a_backend_of_some_pieces_runs_only_their_kernels_to_the_same_values(piece, triton_backend):
    def steps():
        x = (randn(2, 12, 5, 5) * torch.linspace(0.2, 3, 12, device=DEVICE).view(1, -1, 1, 1))
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.nn.Parameter(randn(6, 12, 3, 3, seed=1).contiguous(memory_format=torch.channels_last) / 5)
        y = approx_conv2d(x, w, None, 1, 1, 1, SamplingConfig("topk", ratio=0.5))
        y.backward(randn(*y.shape, seed=2).contiguous(memory_format=torch.channels_last))
        return (y, x.grad, w.grad, *_linear_step(SamplingConfig("topk", ratio=0.5), column_major=True))

    kernels.set_backend(f"triton:{piece}")
    with KernelOps() as seen:
        fused = steps()
    assert kernels.backend() == f"triton:{piece}" and seen.names == PIECE_OPS[piece]
    kernels.set_backend("torch")
    for a, b in zip(fused, steps()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compiled_sampled_mlp_with_triton_kernels_has_no_graph_break_and_equal_results(triton_backend):
    import torch._dynamo as dynamo

    from approxtrain.modules import ApproxLinear

    def mlp():
        torch.manual_seed(0)
        config = SamplingConfig("topk", ratio=0.5)
        return torch.nn.Sequential(ApproxLinear(32, 24, sampling=config), torch.nn.ReLU(),
                                   ApproxLinear(24, 8, sampling=config)).to(DEVICE)

    x = randn(16, 32) * torch.linspace(0.2, 3, 32, device=DEVICE)
    eager, compiled = mlp(), mlp()
    dynamo.reset()
    explanation = dynamo.explain(lambda t: compiled(t).sum())(x)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    step = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for _model, run in ((eager, eager), (compiled, step)):
        run(x).square().sum().backward()
    for a, b in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
