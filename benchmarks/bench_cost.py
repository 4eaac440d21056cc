"""Cost of krylovexp against its floor: forward pass, gradient and memory.

Problem: 2-D periodic 5-point Laplacian `A(κ) = κ Δ_h` on the unit square, `N × N` grid
(matrix-free, `jnp.roll`), smooth Gaussian start `v`, time `t` chosen so that
`‖tA‖₂ = 8 κ t N² = ρ`. Loss `sum(u(t)²)`, `u(t) = exp(tA(κ)) v`; "gradient" is
`jax.grad(loss, argnums=(0, 1))`, with respect to κ and `v` together.

"Floor": a plain fixed-dimension implementation written knowing the Krylov dimensions
krylovexp chose, substep by substep (same number of substeps, same dimension each):
the Lanczos three-term recurrence, or Arnoldi with two classical Gram–Schmidt passes,
the basis preallocated at exactly `k + 1` rows, and a dense `expm` of the `k × k`
projected matrix. It has no error estimate and no step-size control; it is what one
writes knowing `k` in advance.

Columns: `fwd` and `floor` (ms), `grad` (ms), the ratios `fwd/floor` and `grad/fwd`,
`k` (Krylov dimensions per substep), substeps, matvecs, and XLA's memory estimate of the
compiled forward pass and gradient (temp + arguments + outputs, MB). Timings are
AOT-compiled and warmed up, medians of `--repeats` calls ended by `block_until_ready`.

    python benchmarks/bench_cost.py --grids 64,128,256,512 --norms 50,1000

`--grid N` runs one grid; `--methods lanczos` one method; `--dtype float32` single
precision (rtol 1e-5 by default).
"""

import argparse
import pathlib
import sys

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.scipy.linalg as jsl  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import krylovexp as kx  # noqa: E402
from support.cli import add_common_arguments, comma_list, resolve_methods  # noqa: E402
from support.measure import (  # noqa: E402
    compiled_memory_mb,
    memory_environment,
    timed,
)


METHODS = ("lanczos", "arnoldi")


def laplacian(u, kappa):
    n = u.shape[0]
    return (
        kappa
        * n**2
        * (
            jnp.roll(u, 1, 0)
            + jnp.roll(u, -1, 0)
            + jnp.roll(u, 1, 1)
            + jnp.roll(u, -1, 1)
            - 4 * u
        )
    )


def operator(kappa, shape, dtype, symmetric):
    tags = lx.symmetric_tag if symmetric else ()
    return lx.FunctionLinearOperator(
        lambda u: laplacian(u, kappa), jax.ShapeDtypeStruct(shape, dtype), tags
    )


def start_vector(n, dtype):
    x = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(x, x, indexing="ij")
    return jnp.asarray(np.exp(-((xx - 0.4) ** 2 + (yy - 0.55) ** 2) / 0.02), dtype)


# ------------------------------------------------------------------------ the floor


def floor_lanczos(matvec, v, k: int, tau):
    """`exp(tau A) v` by `k` steps of the Lanczos three-term recurrence."""
    beta0 = jnp.linalg.norm(v)
    basis = jnp.zeros((k + 1,) + v.shape, v.dtype).at[0].set(v / beta0)

    def body(j, carry):
        basis, alpha, beta = carry
        w = matvec(basis[j])
        a = jnp.vdot(basis[j], w)
        w = w - a * basis[j] - beta[j] * basis[jnp.maximum(j - 1, 0)]
        b = jnp.linalg.norm(w)
        return basis.at[j + 1].set(w / b), alpha.at[j].set(a), beta.at[j + 1].set(b)

    zero = jnp.zeros(k + 1, v.real.dtype)
    basis, alpha, beta = jax.lax.fori_loop(0, k, body, (basis, zero[:k], zero))
    tri = jnp.diag(alpha) + jnp.diag(beta[1:k], 1) + jnp.diag(beta[1:k], -1)
    coeffs = jsl.expm(tau * tri)[:, 0]
    return beta0 * jnp.tensordot(coeffs, basis[:k], axes=1)


def floor_arnoldi(matvec, v, k: int, tau):
    """`exp(tau A) v` by `k` Arnoldi steps with two classical Gram–Schmidt passes."""
    shape = v.shape
    beta0 = jnp.linalg.norm(v)
    basis = jnp.zeros((k + 1, v.size), v.dtype).at[0].set(v.ravel() / beta0)
    rows = jnp.arange(k + 1)

    def body(j, carry):
        basis, hess = carry
        w = matvec(basis[j].reshape(shape)).ravel()
        mask = rows <= j
        c1 = jnp.where(mask, basis @ w, 0)
        w = w - c1 @ basis
        c2 = jnp.where(mask, basis @ w, 0)
        w = w - c2 @ basis
        b = jnp.linalg.norm(w)
        column = (c1 + c2).at[j + 1].set(b)
        return basis.at[j + 1].set(w / b), hess.at[:, j].set(column)

    hess = jnp.zeros((k + 1, k), v.dtype)
    basis, hess = jax.lax.fori_loop(0, k, body, (basis, hess))
    coeffs = jsl.expm(tau * hess[:k])[:, 0]
    return (beta0 * (coeffs @ basis[:k])).reshape(shape)


def floor_expmv(kappa, v, t, dims, method):
    """The floor over the substeps krylovexp took (equal substeps of `t`)."""
    step = floor_lanczos if method == "lanczos" else floor_arnoldi
    tau = t / len(dims)
    for k in dims:
        v = step(lambda u: laplacian(u, kappa), v, k, tau)
    return v


# ---------------------------------------------------------------------- measurement


def measure(n, rho, method, rtol, dtype, repeats, solver_options):
    kappa = jnp.asarray(1.0, dtype)
    v = start_vector(n, dtype)
    t = rho / (8.0 * n**2)
    symmetric = method == "lanczos"
    solver = kx.KrylovExpm(method=method, rtol=rtol, **solver_options)

    def fwd(kappa, v):
        sol = solver.expmv(operator(kappa, v.shape, dtype, symmetric), v, t)
        return sol.value, sol.stats

    def loss(kappa, v):
        return jnp.sum(solver(operator(kappa, v.shape, dtype, symmetric), v, t) ** 2)

    fwd_c = jax.jit(fwd).lower(kappa, v).compile()
    grad_c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kappa, v).compile()
    value, stats = fwd_c(kappa, v)
    substeps = int(stats["num_substeps"])
    dims = [int(d) for d in np.asarray(stats["krylov_dims"])[:substeps]]
    floor_c = (
        jax.jit(lambda kappa, v: floor_expmv(kappa, v, t, dims, method))
        .lower(kappa, v)
        .compile()
    )
    floor_value = floor_c(kappa, v)
    # Three rounds, interleaved so that machine noise affects the three alike; the
    # best round's median of each.
    t_fwd, t_floor, t_grad = [], [], []
    for _ in range(3):
        t_fwd.append(1e3 * timed(fwd_c, kappa, v, repeats=repeats)[1])
        t_floor.append(1e3 * timed(floor_c, kappa, v, repeats=repeats)[1])
        t_grad.append(1e3 * timed(grad_c, kappa, v, repeats=repeats)[1])
    t_fwd, t_floor, t_grad = map(min, (t_fwd, t_floor, t_grad))
    scale = float(jnp.linalg.norm(value))
    return dict(
        grid=f"{n}²",
        rho=rho,
        method=method,
        k="+".join(map(str, dims)),
        substeps=substeps,
        matvecs=int(stats["num_matvecs"]),
        fwd=t_fwd,
        floor=t_floor,
        grad=t_grad,
        fwd_floor=t_fwd / t_floor,
        grad_fwd=t_grad / t_fwd,
        floor_diff=float(jnp.linalg.norm(floor_value - value)) / scale,
        mem_fwd=compiled_memory_mb(fwd_c),
        mem_grad=compiled_memory_mb(grad_c),
    )


HEADER = (
    "| grid | ‖tA‖ | method | k | substeps | matvecs | fwd ms | floor ms | grad ms "
    "| fwd/floor | grad/fwd | fwd MB | grad MB |"
)


def row(r):
    return (
        f"| {r['grid']} | {r['rho']:g} | {r['method']} | {r['k']} | {r['substeps']} "
        f"| {r['matvecs']} | {r['fwd']:.2f} | {r['floor']:.2f} | {r['grad']:.2f} "
        f"| {r['fwd_floor']:.2f} | {r['grad_fwd']:.2f} | {r['mem_fwd']:.1f} "
        f"| {r['mem_grad']:.1f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, script="bench_cost", methods=METHODS, grid=None)
    parser.set_defaults(grid=None)
    parser.add_argument("--grids", type=comma_list(int), default=[64, 128, 256, 512])
    parser.add_argument("--norms", type=comma_list(float), default=[50.0, 1000.0])
    parser.add_argument("--rtol", type=float, default=None)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    grids = [args.grid] if args.grid is not None else args.grids
    methods = resolve_methods(args.methods, METHODS)
    dtype = jnp.dtype(args.dtype)
    rtol = (
        args.rtol if args.rtol is not None else (1e-8 if dtype == jnp.float64 else 1e-5)
    )
    lines = [
        f"jax {jax.__version__}, {jax.default_backend()}, {args.dtype}, rtol {rtol:g}",
        memory_environment(),
        "",
        HEADER,
        "|" + "---|" * 13,
    ]
    print("\n".join(lines), flush=True)
    for n in grids:
        for rho in args.norms:
            for method in methods:
                r = measure(n, rho, method, rtol, dtype, args.repeats, {})
                lines.append(row(r))
                print(lines[-1], flush=True)
                if r["floor_diff"] > 1e3 * rtol:
                    print(f"  (floor differs from krylovexp by {r['floor_diff']:.1e})")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
