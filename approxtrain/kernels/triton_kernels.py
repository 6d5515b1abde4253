"""The Triton kernels of the GPU path (see :mod:`approxtrain.kernels` for when they run).

* :func:`column_sq_sums_kernel` -- the fp32 sum of squares of every column of a row-major
  ``(M, n)`` matrix (an NHWC activation viewed ``(N*H*W, C)``), in one pass: each program
  reduces a ``BLOCK_N``-column strip over a slab of rows into its own row of a partial-sums
  buffer (deterministic: no atomics), summed afterwards over the slabs.
* :func:`topk_mask_kernel` / :func:`compact_kernel` -- the ``k`` largest scores without a sort:
  a score's rank is the number of scores above it (ties: the lower index first), the ranks
  ``< k`` are kept, and one program writes their indices in ascending order (an exclusive
  prefix sum gives each its place).
* :func:`gather_matmul_kernel` -- ``C = A @ B`` where one logical axis (the rows ``i``, the inner
  ``r`` or the columns ``j``) is the list ``keep``: both operands that have that axis read only
  its kept slices, and a kept axis of ``C`` is written at the kept places (the rest of ``C`` is
  left alone); an operand may also hold just the ``k`` kept slices. The kept slices are
  multiplied by ``scale`` (on the weight operand ``B`` when the kept axis is the inner one). Tensor cores through
  ``tl.dot``; fp32 accumulation.
* :func:`take_columns_kernel` / :func:`spread_columns_kernel` -- ``x[:, keep]`` of a row-major
  matrix, and the inverse: a full ``(M, n)`` matrix holding ``g``'s columns at ``keep``, zeros
  elsewhere, each element written once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def column_sq_sums_kernel(x_ptr, partial_ptr, M, N, stride_m, rows_per_program,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid_m * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < last) & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partial_ptr + pid_m * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def topk_mask_kernel(scores_ptr, keep_mask_ptr, N, K, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < N
    s_i = tl.load(scores_ptr + i, mask=i_ok, other=0.0)
    s_i = tl.where(s_i != s_i, float("inf"), s_i)  # NaN ranks as the largest (as in torch.topk): a total order
    rank = tl.zeros((BLOCK_I,), dtype=tl.int32)
    for start in range(0, N, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        s_j = tl.load(scores_ptr + j, mask=j < N, other=float("-inf"))
        s_j = tl.where(s_j != s_j, float("inf"), s_j)
        above = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(above.to(tl.int32), axis=1)
    tl.store(keep_mask_ptr + i, (rank < K).to(tl.int32), mask=i_ok)


@triton.jit
def compact_kernel(keep_mask_ptr, keep_ptr, N, BLOCK: tl.constexpr):
    placed = 0
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        kept = tl.load(keep_mask_ptr + i, mask=i < N, other=0)
        place = placed + tl.cumsum(kept, axis=0) - kept
        tl.store(keep_ptr + place, i.to(tl.int64), mask=kept != 0)
        placed += tl.sum(kept, axis=0)


@triton.jit
def gather_matmul_kernel(a_ptr, b_ptr, c_ptr, keep_ptr, scale_ptr, I, J, R,
                         stride_ai, stride_ar, stride_br, stride_bj, stride_ci, stride_cj,
                         AXIS: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, GATHER_C: tl.constexpr,
                         HAS_SCALE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
                         GROUP_I: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # AXIS: the logical axis ``keep`` lists (0: i, 1: r, 2: j), of length I, R or J = k; GATHER_X:
    # whether operand X holds all n slices there (read at ``keep``) or just the k kept ones.
    # INPUT_PRECISION: fp32 operands' tensor-core precision ("ieee" or "tf32"), as torch's matmuls use.
    pid = tl.program_id(0)
    programs_i = tl.cdiv(I, BLOCK_I)
    programs_j = tl.cdiv(J, BLOCK_J)
    in_group = GROUP_I * programs_j  # grouped order: neighbouring programs share B tiles in L2
    first_i = (pid // in_group) * GROUP_I
    group_size = tl.minimum(programs_i - first_i, GROUP_I)
    pid_i = first_i + (pid % in_group) % group_size
    pid_j = (pid % in_group) // group_size
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < I
    j_ok = offs_j < J
    rows_a = offs_i
    rows_c = offs_i
    cols_b = offs_j
    cols_c = offs_j
    if AXIS == 0:
        kept_i = tl.load(keep_ptr + offs_i, mask=i_ok, other=0)
        if GATHER_A:
            rows_a = kept_i
        if GATHER_C:
            rows_c = kept_i
    if AXIS == 2:
        kept_j = tl.load(keep_ptr + offs_j, mask=j_ok, other=0)
        if GATHER_B:
            cols_b = kept_j
        if GATHER_C:
            cols_c = kept_j
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        inner_a = offs_r
        inner_b = offs_r
        if AXIS == 1:
            kept_r = tl.load(keep_ptr + offs_r, mask=r_ok, other=0)
            if GATHER_A:
                inner_a = kept_r
            if GATHER_B:
                inner_b = kept_r
        a = tl.load(a_ptr + rows_a[:, None].to(tl.int64) * stride_ai + inner_a[None, :].to(tl.int64) * stride_ar,
                    mask=i_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + inner_b[:, None].to(tl.int64) * stride_br + cols_b[None, :].to(tl.int64) * stride_bj,
                    mask=r_ok[:, None] & j_ok[None, :], other=0.0)
        if HAS_SCALE:
            if AXIS == 1:
                s = tl.load(scale_ptr + offs_r, mask=r_ok, other=0.0)
                b = (b.to(tl.float32) * s[:, None]).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_SCALE:
        if AXIS == 0:
            acc = acc * tl.load(scale_ptr + offs_i, mask=i_ok, other=0.0)[:, None]
        if AXIS == 2:
            acc = acc * tl.load(scale_ptr + offs_j, mask=j_ok, other=0.0)[None, :]
    c = c_ptr + rows_c[:, None].to(tl.int64) * stride_ci + cols_c[None, :].to(tl.int64) * stride_cj
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def take_columns_kernel(x_ptr, keep_ptr, out_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs < K
    src = tl.load(keep_ptr + offs, mask=k_ok, other=0)
    mask = (rows[:, None] < M) & k_ok[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + src[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + offs[None, :], x, mask=mask)


@triton.jit
def spread_columns_kernel(g_ptr, source_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # source[c]: column c's place in g, or K where c was not kept (written as zero)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    src = tl.load(source_ptr + cols, mask=n_ok, other=K)
    row_ok = rows[:, None] < M
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * K + src[None, :], mask=row_ok & (src[None, :] < K), other=0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], g, mask=row_ok & n_ok[None, :])
