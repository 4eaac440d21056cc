"""Throughput of `vmap` over many solves: `KrylovExpm(batching="sequential")` against
`batching="batched"` (with `--groups`, also in groups of `batch_size` elements),
forward and gradient.

Problem: `B` 2-D heat problems (problem A of `bench_expm.py`: Dirichlet 5-point
Laplacian `κ Δ_h`, matrix-free) sharing κ, each from its own Gaussian bump, at a time
`T` with `‖TA‖₂ = --norm`. Forward: `vmap` of `expmv` over the start vectors.
Gradient: `grad` of `sum(u(T)²)` over the batch with respect to κ and the start
vectors together. Lanczos (the operator is symmetric-tagged), default tolerances.

Columns: grid, `B`, mode, forward and gradient wall time per call (ms) and per solve
(solves/s), the per-solve ratio of the batched to the sequential mode (below 1: the
batched mode is faster), the largest difference between the two modes' values
(relative), and XLA's memory estimate of the compiled gradient (MB). Timings are
AOT-compiled and warmed up, medians of `--repeats` calls ended by
`block_until_ready`.

    python benchmarks/bench_batching.py --grids 64,128 --batches 1,16,64,256
    python benchmarks/bench_batching.py --grids 64,128 --batches 64 --groups 2,4

The table also goes to `<--out>/table.md`.
"""

import argparse
import pathlib
import sys

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import krylovexp as kx  # noqa: E402
from support.cli import comma_list  # noqa: E402
from support.measure import compiled_memory_mb, rel_err, timed  # noqa: E402
from support.problems import gaussian_bump, heat_problem  # noqa: E402


def start_vectors(n: int, batch: int) -> np.ndarray:
    """`batch` Gaussian bumps with centres spread over the square and widths that
    differ, so the elements need different Krylov dimensions."""
    rng = np.random.default_rng(0)
    centres = rng.uniform(0.25, 0.75, size=(batch, 2))
    widths = rng.uniform(0.03, 0.12, size=batch)
    return np.stack(
        [gaussian_bump(n, tuple(c), w) for c, w in zip(centres, widths, strict=True)]
    )


def run(n: int, batch: int, norm: float, repeats: int, groups) -> list[dict]:
    problem = heat_problem(n, T=1.0)
    T = norm / (8 * (n + 1) ** 2)
    vectors = jnp.asarray(start_vectors(n, batch))
    kappa = jnp.asarray(problem.theta)
    rows, values = [], {}
    modes = [("sequential", None), ("batched", None)]
    modes += [("batched", g) for g in groups if g < batch]
    for mode, group in modes:
        solver = kx.KrylovExpm(batching=mode, batch_size=group)
        label = mode if group is None else f"batched, groups of {group}"

        def forward(kappa, vectors, solver=solver):
            operator = problem.operator(kappa)
            return jax.vmap(lambda v: solver(operator, v, T))(vectors)

        def loss(kappa, vectors, forward=forward):
            return jnp.sum(forward(kappa, vectors) ** 2)

        fwd = jax.jit(forward).lower(kappa, vectors).compile()
        grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kappa, vectors).compile()
        out, fwd_s = timed(fwd, kappa, vectors, repeats=repeats)
        _, grad_s = timed(grad, kappa, vectors, repeats=repeats)
        values[label] = out
        rows.append(
            dict(
                grid=n,
                batch=batch,
                mode=label,
                fwd_ms=1e3 * fwd_s,
                fwd_rate=batch / fwd_s,
                grad_ms=1e3 * grad_s,
                grad_rate=batch / grad_s,
                grad_mb=compiled_memory_mb(grad),
            )
        )
    seq = rows[0]
    for row in rows[1:]:
        row["fwd_ratio"] = row["fwd_ms"] / seq["fwd_ms"]
        row["grad_ratio"] = row["grad_ms"] / seq["grad_ms"]
        row["diff"] = rel_err(values[row["mode"]], values["sequential"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=comma_list(int), default=[64, 128])
    parser.add_argument("--batches", type=comma_list(int), default=[1, 16, 64, 256])
    parser.add_argument("--norm", type=float, default=50.0, help="‖TA‖₂")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--groups",
        type=comma_list(int),
        default=[],
        help="also the batched mode in groups of these sizes (`batch_size`)",
    )
    parser.add_argument("--out", default="out/bench_batching", help="table folder")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)
        (out / "table.md").write_text("\n".join(lines) + "\n")

    emit(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    emit("")
    emit(
        "| grid | B | mode | fwd ms | fwd solves/s | grad ms | grad solves/s "
        "| batched/sequential fwd, grad | value diff | grad MB |"
    )
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.grids:
        for batch in args.batches:
            for row in run(n, batch, args.norm, args.repeats, args.groups):
                ratio = (
                    f"{row['fwd_ratio']:.2f}, {row['grad_ratio']:.2f}"
                    if "fwd_ratio" in row
                    else ""
                )
                diff = f"{row['diff']:.1e}" if "diff" in row else ""
                memory = "" if row["grad_mb"] is None else f"{row['grad_mb']:.0f}"
                emit(
                    f"| {n}² | {batch} | {row['mode']} | {row['fwd_ms']:.1f} "
                    f"| {row['fwd_rate']:.0f} | {row['grad_ms']:.1f} "
                    f"| {row['grad_rate']:.0f} | {ratio} | {diff} | {memory} |"
                )


if __name__ == "__main__":
    main()
