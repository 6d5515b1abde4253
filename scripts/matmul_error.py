"""Approximation error of column-row sampling (CRS) on random matrices: Fig. 1a/1b.

Adelman & Silberstein 2018, Sec. 3.2. For ``size x size`` matrices ``A`` and ``B``,
every CRS variant keeps ``k`` of the ``n`` column-row pairs, chosen by
:func:`approxtrain.sampling.select` from the scores ``|A^(i)| |B_(i)|``, and the
error is::

    || A B - A[:, keep] D B[keep, :] ||_F / (||A||_F ||B||_F)

averaged over ``--draws`` fresh pairs of matrices (one selection per pair). The kept
pairs enter as weights ``w`` (``A[:, keep] D B[keep, :] = A diag(w) B``) and the error is
evaluated for all draws at once through the exact identity
``||A diag(1 - w) B||_F^2 = (1 - w)^T ((A^T A) * (B B^T)) (1 - w)``; the tests check it
against the products themselves. Case (a):
entries of A and B i.i.d. N(0, 1); case (b): A ~ N(0, 1), B ~ N(1, 1). The NPS upper
bound (Drineas, Kannan & Mahoney 2006, Theorem 1) is ``E ||AB - CR||_F <=
||A||_F ||B||_F / sqrt(k)``, i.e. ``1 / sqrt(k)`` in this metric.

Writes ``matmul_error.csv`` and ``matmul_error.png`` to ``--out`` and prints a table
and whether the paper's three observations hold (PASS/FAIL; exit code 0 either way).

    python scripts/matmul_error.py [--draws 1000] [--size 100] [--seed 0] [--out outputs/matmul_error]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

try:
    from approxtrain.sampling import SamplingConfig, num_kept, select
except ModuleNotFoundError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from approxtrain.sampling import SamplingConfig, num_kept, select

# name -> (config, label in the plot). The first six are the paper's legend (Fig. 1).
VARIANTS: dict[str, tuple[SamplingConfig, str]] = {
    "topk": (SamplingConfig("topk"), "deterministic top-k"),
    "nps_repl_scale": (SamplingConfig("nps", replacement=True, scale=True), "NPS, replacement, scale"),
    "nps_norepl_noscale": (SamplingConfig("nps", replacement=False, scale=False), "NPS, no replacement, no scale"),
    "uniform_repl_scale": (SamplingConfig("uniform", replacement=True, scale=True), "uniform, replacement, scale"),
    "uniform_norepl_scale": (SamplingConfig("uniform", replacement=False, scale=True), "uniform, no replacement, scale"),
    "uniform_norepl_noscale": (SamplingConfig("uniform", replacement=False, scale=False), "uniform, no replacement, no scale"),
    "nps_norepl_scale": (SamplingConfig("nps", replacement=False, scale=True), "NPS, no replacement, scale (extra)"),
    "bernoulli": (SamplingConfig("bernoulli"), "Bernoulli, scale (extra)"),
}
CASES = {
    "a": "A ~ N(0,1), B ~ N(0,1)",
    "b": "A ~ N(0,1), B ~ N(1,1)",
}
RATIOS = [r / 10 for r in range(1, 11)]
SIMILAR_TOLERANCE = 0.15  # observation 2: |topk - nps_norepl_noscale| / nps_norepl_noscale
SIMILAR_MAX_RATIO = 0.9


def draw_matrices(case: str, draws: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` pairs of (size, size) float64 matrices for ``case``."""
    a = torch.randn(draws, size, size, generator=generator, dtype=torch.float64)
    b = torch.randn(draws, size, size, generator=generator, dtype=torch.float64)
    if case == "b":
        b += 1.0
    return a, b


def select_weights(scores: torch.Tensor, k: int, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One selection per row of ``scores: (draws, n)`` as pair weights ``w: (draws, n)``.

    ``w_i`` is the summed scale of pair ``i`` over the kept list (1 per occurrence without
    scaling, 0 if not kept), so ``A[:, keep] D B[keep, :] = A diag(w) B``.
    """
    weights = torch.zeros(scores.shape, dtype=torch.float64)
    for row, draw_scores in zip(weights, scores):
        selection = select(draw_scores, k, config, generator)
        scale = torch.ones(selection.keep.numel(), dtype=torch.float64) if selection.scale is None else selection.scale.double()
        row.index_add_(0, selection.keep, scale)
    return weights


def pair_gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G = (A^T A) * (B B^T)`` (elementwise), (draws, n, n), for the error's quadratic form."""
    return torch.bmm(a.transpose(1, 2), a) * torch.bmm(b, b.transpose(1, 2))


def relative_errors(gram: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-draw ``||AB - A diag(w) B||_F / (||A||_F ||B||_F)``.

    With ``u = 1 - w``, ``||A diag(u) B||_F^2 = u^T ((A^T A) * (B B^T)) u`` exactly, an
    O(n^2) product per draw instead of an O(n^2 k) matrix product. ``gram`` from
    :func:`pair_gram`, ``scale = ||A||_F ||B||_F`` (draws,), ``weights`` (draws, n) or
    (draws, n, r) for ``r`` selections per draw at once (returns (draws,) or (draws, r)).
    """
    u = 1.0 - weights
    columns = u if u.dim() == 3 else u.unsqueeze(2)
    squared = (columns * torch.bmm(gram, columns)).sum(1)  # (draws, r)
    errors = squared.clamp(min=0.0).sqrt() / scale.unsqueeze(1)
    return errors if u.dim() == 3 else errors.squeeze(1)


def relative_errors_direct(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same metric by the matrix products themselves (a check of :func:`relative_errors`)."""
    approx = torch.bmm(a * weights.unsqueeze(1), b)
    error = torch.linalg.matrix_norm(torch.bmm(a, b) - approx)
    return error / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))


def run(draws: int, size: int, seed: int, chunk: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for case in CASES:
        errors = {(v, r): [] for v in VARIANTS for r in RATIOS}
        for start in range(0, draws, chunk):
            a, b = draw_matrices(case, min(chunk, draws - start), size, generator)
            scores = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=2)  # (draws, n)
            gram = pair_gram(a, b)
            scale = torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b)
            for variant, (config, _) in VARIANTS.items():
                weights = torch.stack([select_weights(scores, num_kept(size, r), config, generator) for r in RATIOS], dim=2)
                for ratio, column in zip(RATIOS, relative_errors(gram, scale, weights).unbind(1)):
                    errors[variant, ratio].append(column)
        for variant in VARIANTS:
            for ratio in RATIOS:
                e = torch.cat(errors[variant, ratio])
                rows.append({
                    "case": case, "variant": variant, "ratio": ratio, "k": num_kept(size, ratio),
                    "mean_error": e.mean().item(), "std_error": e.std().item() if e.numel() > 1 else 0.0,
                    "draws": e.numel(),
                })
    return rows


def observations(rows: list[dict]) -> list[tuple[str, bool, list[str]]]:
    """The paper's three observations: (title, holds, lines of evidence)."""
    mean = {(r["case"], r["variant"], r["ratio"]): r["mean_error"] for r in rows}
    partial = [r for r in RATIOS if r < 1.0]

    def below(case: str, lower: str, higher: str, ratios: list[float]) -> tuple[bool, str]:
        ok = all(mean[case, lower, r] < mean[case, higher, r] for r in ratios)
        worst = max(ratios, key=lambda r: mean[case, lower, r] / mean[case, higher, r])
        return ok, (f"case {case}: {lower} < {higher} at {sum(mean[case, lower, r] < mean[case, higher, r] for r in ratios)}"
                    f"/{len(ratios)} ratios; closest at {worst:.0%}: {mean[case, lower, worst]:.4f} vs {mean[case, higher, worst]:.4f}")

    results = []
    # (1) without replacement beats with replacement, for uniform and NPS (the paper's curves).
    lines, holds = [], True
    for case in CASES:
        for lower, higher in (("uniform_norepl_scale", "uniform_repl_scale"), ("nps_norepl_noscale", "nps_repl_scale")):
            ok, line = below(case, lower, higher, partial)  # at 100 % every variant is the exact product
            holds &= ok
            lines.append(line)
        ok, line = below(case, "nps_norepl_scale", "nps_repl_scale", partial)  # same scaling; informational
        lines.append(line + " (extra, not counted)")
    results.append(("(1) sampling without replacement outperforms sampling with replacement", holds, lines))

    # (2) top-k is similar to NPS without replacement and without scaling.
    lines, holds = [], True
    similar = [r for r in RATIOS if r <= SIMILAR_MAX_RATIO]
    for case in CASES:
        gaps = {r: abs(mean[case, "topk", r] - mean[case, "nps_norepl_noscale", r]) / mean[case, "nps_norepl_noscale", r] for r in similar}
        worst = max(gaps, key=gaps.get)
        ok = gaps[worst] <= SIMILAR_TOLERANCE
        holds &= ok
        lower = sum(mean[case, "topk", r] < mean[case, "nps_norepl_noscale", r] for r in similar)
        lines.append(f"case {case}: max |topk - nps_norepl_noscale| / nps_norepl_noscale over ratios <= {SIMILAR_MAX_RATIO:.0%} = "
                     f"{gaps[worst]:.1%} at {worst:.0%} "
                     f"({mean[case, 'topk', worst]:.4f} vs {mean[case, 'nps_norepl_noscale', worst]:.4f}); "
                     f"threshold {SIMILAR_TOLERANCE:.0%}; top-k lower at {lower}/{len(similar)} ratios")
        lines.append(f"case {case}: relative gap per ratio: " + ", ".join(f"{r:.0%} {gaps[r]:.1%}" for r in similar))
    results.append((f"(2) deterministic top-k is similar to NPS without replacement and without scaling "
                    f"(within {SIMILAR_TOLERANCE:.0%} relative at every ratio <= {SIMILAR_MAX_RATIO:.0%})", holds, lines))

    # (3) zero-mean i.i.d. entries (case a): scaling only increases the error.
    lines, holds = [], True
    for lower, higher in (("uniform_norepl_noscale", "uniform_norepl_scale"), ("nps_norepl_noscale", "nps_norepl_scale")):
        ok, line = below("a", lower, higher, partial)
        holds &= ok
        lines.append(line)
    for lower, higher in (("uniform_norepl_noscale", "uniform_norepl_scale"), ("nps_norepl_noscale", "nps_norepl_scale")):
        lines.append(below("b", lower, higher, partial)[1] + " (case b, informational)")
    results.append(("(3) with zero-mean i.i.d. entries (case a) scaling only increases the error "
                    "(unscaled < scaled, same sampler, ratios < 100%)", holds, lines))
    return results


def bound_holds(rows: list[dict]) -> list[str]:
    """NPS with replacement and scaling against its bound 1/sqrt(k)."""
    lines = []
    for case in CASES:
        nps = [r for r in rows if r["case"] == case and r["variant"] == "nps_repl_scale"]
        under = sum(r["mean_error"] <= 1 / math.sqrt(r["k"]) for r in nps)
        lines.append(f"case {case}: nps_repl_scale mean error <= 1/sqrt(k) at {under}/{len(nps)} ratios")
    return lines


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "variant", "ratio", "k", "mean_error", "std_error", "draws"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "ratio": f"{r['ratio']:.1f}", "mean_error": f"{r['mean_error']:.6g}",
                             "std_error": f"{r['std_error']:.6g}"})


def plot(rows: list[dict], size: int, draws: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharey=True)
    for ax, (case, title) in zip(axes, CASES.items()):
        for variant, (_, label) in VARIANTS.items():
            points = [(r["ratio"] * 100, r["mean_error"]) for r in rows if r["case"] == case and r["variant"] == variant]
            points = [(x, y) for x, y in points if y > 0]  # log axis: exact products (error 0) are left out
            style = ":" if "extra" in label else "-"
            ax.plot(*zip(*points), style, marker="o", markersize=3, label=label)
        ks = [num_kept(size, r) for r in RATIOS]
        ax.plot([r * 100 for r in RATIOS], [1 / math.sqrt(k) for k in ks], "k--", label="NPS upper bound 1/sqrt(k)")
        ax.set_yscale("log")
        ax.set_xlabel("% of computations")
        ax.set_title(f"({case}) {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("||AB - ÃDB̃||_F / (||A||_F ||B||_F)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=5)
    fig.suptitle(f"CRS approximation error, {size}x{size} matrices, mean of {draws} draws")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    mean = {(r["case"], r["variant"], r["ratio"]): r["mean_error"] for r in rows}
    for case, title in CASES.items():
        print(f"\nCase ({case}): {title} -- mean relative Frobenius error")
        print(f"{'variant':<24}" + "".join(f"{r:>8.0%}" for r in RATIOS))
        for variant in VARIANTS:
            print(f"{variant:<24}" + "".join(f"{mean[case, variant, r]:>8.4f}" for r in RATIOS))
        k = {r["ratio"]: r["k"] for r in rows}
        print(f"{'NPS bound 1/sqrt(k)':<24}" + "".join(f"{1 / math.sqrt(k[r]):>8.4f}" for r in RATIOS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=1000, help="random matrix pairs per point (default 1000)")
    parser.add_argument("--size", type=int, default=100, help="matrices are size x size (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator for matrices and samplers")
    parser.add_argument("--out", type=Path, default=Path("outputs/matmul_error"), help="output folder")
    parser.add_argument("--chunk", type=int, default=500, help="draws processed together in one batched product")
    args = parser.parse_args(argv)
    if args.draws < 1 or args.size < 2 or args.chunk < 1:
        parser.error(f"--draws={args.draws}, --size={args.size}, --chunk={args.chunk}; allowed: draws >= 1, size >= 2, chunk >= 1")

    started = time.perf_counter()
    rows = run(args.draws, args.size, args.seed, args.chunk)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "matmul_error.csv")
    plot(rows, args.size, args.draws, args.out / "matmul_error.png")

    print(f"CRS matrix-product error: {args.size}x{args.size}, {args.draws} draws, seed {args.seed}, "
          f"torch {torch.__version__}, {time.perf_counter() - started:.1f} s")
    print_table(rows)
    print("\nObservations (Adelman & Silberstein 2018, Sec. 3.2):")
    for title, holds, lines in observations(rows):
        print(f"[{'PASS' if holds else 'FAIL'}] {title}")
        for line in lines:
            print(f"    {line}")
    print("NPS upper bound (Drineas-Kannan-Mahoney Theorem 1):")
    for line in bound_holds(rows):
        print(f"    {line}")
    print(f"\nwrote {args.out / 'matmul_error.csv'} and {args.out / 'matmul_error.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
