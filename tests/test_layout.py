"""Layout helpers: each equals the plain op it stands for, in every memory layout and on
both spreading paths, and hands its result back in the layout asked for."""

from __future__ import annotations

import pytest
import torch

from approxtrain._layout import is_channels_last, is_column_major, matmul_into, norms, spread, take
from approxtrain.sampling import Selection


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "column_major":
        return t.t().contiguous().t()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.cat([t, t], dim=-1)[..., ::2]
    return t


KEEPS = {"unique": (torch.tensor([4, 0, 2]), True), "repeated": (torch.tensor([2, 0, 2, 5]), False)}


@pytest.mark.parametrize(("shape", "layout", "dim"), [
    ((5, 7), "row_major", 1), ((7, 5), "row_major", 0), ((5, 7), "column_major", 1), ((7, 5), "column_major", 0),
    ((3, 6, 4, 5), "nchw", 1), ((3, 6, 4, 5), "channels_last", 1), ((6, 3, 4, 5), "channels_last", 0),
    ((3, 6, 4, 5), "strided", 1),
])
@pytest.mark.parametrize("keep", list(KEEPS))
def test_take_is_index_select(shape, layout, dim, keep):
    t = laid_out(torch.randn(shape, generator=gen(0)), layout)
    taken = take(t, dim, KEEPS[keep][0])
    assert torch.equal(taken, t.index_select(dim, KEEPS[keep][0]))
    if layout in ("column_major", "channels_last") and dim == 1:  # copied in t's own layout
        assert is_column_major(taken) if layout == "column_major" else is_channels_last(taken)


@pytest.mark.parametrize(("shape", "dim", "channels_last"), [
    ((4, 3), 1, False), ((3, 4), 0, False), ((2, 3, 4, 5), 1, False), ((2, 3, 4, 5), 1, True), ((3, 2, 4, 5), 0, False),
])
@pytest.mark.parametrize("keep", list(KEEPS))
def test_spread_is_index_add_into_zeros(shape, dim, channels_last, keep):
    indices, unique = KEEPS[keep]
    shape = list(shape)
    shape[dim] = indices.numel()
    values = torch.randn(shape, generator=gen(1))
    if channels_last:
        values = values.contiguous(memory_format=torch.channels_last)
    full = list(shape)
    full[dim] = 6
    expected = torch.zeros(full).index_add_(dim, indices, values)
    result = spread(values, dim, 6, Selection(indices, None, unique), channels_last)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    assert is_channels_last(result) == channels_last


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("column_major", [False, True], ids=["row_major", "column_major"])
@pytest.mark.parametrize("keep", list(KEEPS))
def test_matmul_into_is_the_product_spread(dim, column_major, keep, spread_path):
    indices, unique = KEEPS[keep]
    k, n = indices.numel(), 6
    a = torch.randn(5 if dim == 1 else k, 4, generator=gen(2))
    b = torch.randn(4, k if dim == 1 else 5, generator=gen(3))
    expected = torch.zeros(5 if dim == 1 else n, n if dim == 1 else 5).index_add_(dim, indices, a @ b)
    with torch.no_grad():  # (a differentiable product always takes the plain path)
        result = matmul_into(a, b, dim, n, Selection(indices, None, unique), column_major)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    assert is_column_major(result) == column_major


@pytest.mark.parametrize("shape", [(7, 5), (50, 500), (3000, 400), (3001, 400)], ids=["tiny", "one-block", "slabs", "slabs+rest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
def test_column_norms_equal_vector_norm(shape, dtype, threads):
    a = torch.randn(*shape, generator=gen(0)).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # large inputs are cut into one slab of rows per thread
    try:
        column_norms = norms(a, 1)
    finally:
        torch.set_num_threads(before)
    assert column_norms.dtype == torch.float32
    torch.testing.assert_close(column_norms, torch.linalg.vector_norm(a.float(), dim=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_channel_norms_equal_vector_norm_in_every_layout(layout):
    t = torch.randn(4, 6, 5, 3, generator=gen(0))
    expected = torch.linalg.vector_norm(t, dim=(0, 2, 3))
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        t = torch.randn(4, 6, 5, 6, generator=gen(1))[..., ::2]
        expected = torch.linalg.vector_norm(t, dim=(0, 2, 3))
    torch.testing.assert_close(norms(t, 1), expected, rtol=1e-5, atol=1e-5)
