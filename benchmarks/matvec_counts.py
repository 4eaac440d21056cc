"""Matvec counts and achieved errors of `KrylovExpm`, no timings.

A quick check of what a change to the acceptance rule or the error estimate costs:

1. the problems of `bench_expm.py` (A: 2-D heat, Lanczos; B: advection–diffusion,
   Arnoldi) at `T = 0.01`, forward value only;
2. small-step, integrator-like calls where small Krylov dimensions are right: the same
   operators at short times (`‖TA‖₂` from 0.01 to 5), `expmv` and `phimv` with `p = 1`
   and `p = 3`;
3. whole integrations with the exponential integrators (`ETDRK4` with fixed steps,
   `Exprb43` adaptive) of a stiff semilinear 1-D problem, matvecs summed by the solver.

Errors are relative 2-norms against SciPy (`expm_multiply` on the sparse matrix, for
phi-functions on the augmented matrix of Al-Mohy & Higham 2011), and for the
integrations against a run with `rtol = 1e-12` and four times as many steps.

    python benchmarks/matvec_counts.py --grid 64
"""

import argparse
import pathlib
import sys

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import krylovexp as kx  # noqa: E402
from support.measure import rel_err  # noqa: E402
from support.problems import PROBLEMS  # noqa: E402


def phi_reference(sparse, vectors, t):
    """`sum_j t^j phi_j(tA) b_j` as the top block of `exp(t Ã) [b_0; e_p]`."""
    n = sparse.shape[0]
    p = len(vectors) - 1
    if p == 0:
        return spla.expm_multiply(t * sparse, vectors[0])
    coupling = sp.csr_matrix(np.stack(vectors[:0:-1], axis=1))
    shift = sp.csr_matrix(np.eye(p, k=1))
    augmented = sp.bmat([[sparse, coupling], [None, shift]]).tocsr()
    start = np.concatenate([vectors[0], np.eye(p)[-1]])
    return spla.expm_multiply(t * augmented, start)[:n]


def phimv_stats(solver, operator, vectors, t):
    # Arrays, not Python floats: `filter_jit` would compile once per value.
    vectors = tuple(jnp.asarray(b) for b in vectors)
    return _phimv_stats(solver, operator, vectors, jnp.asarray(t))


@eqx.filter_jit
def _phimv_stats(solver, operator, vectors, t):
    sol = solver.phimv(operator, vectors, t)
    return sol.value, sol.result, sol.stats


def row(label, setting, value, result, stats, ref):
    ok = "ok" if result == kx.RESULTS.successful else "FAIL"
    print(
        f"| {label} | {setting} | {int(stats['num_matvecs'])} | "
        f"{int(stats['num_substeps'])} | {int(stats['max_krylov_dim'])} | "
        f"{rel_err(value, ref):.1e} | {float(stats['growth_factor']):.3g} | {ok} |"
    )
    return int(stats["num_matvecs"])


def core(n, rtols):
    print("\n### bench_expm problems (T = 0.01)\n")
    print(
        "| problem | rtol | matvecs | substeps | max k | rel. error | growth factor "
        "| result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    total = 0
    for name in ("A", "B"):
        p = PROBLEMS[name](n=n)
        ref = spla.expm_multiply(p.T * p.sparse(p.theta), p.u0)
        for rtol in rtols:
            value, result, stats = phimv_stats(
                kx.KrylovExpm(rtol=rtol), p.operator(p.theta), (p.u0,), p.T
            )
            total += row(name, f"{rtol:.0e}", value, result, stats, ref)
    return total


def small_steps(n, rtols):
    print("\n### Small steps (integrator-like calls)\n")
    print(
        "| problem | ‖TA‖₂, p, rtol | matvecs | substeps | max k | rel. error | "
        "growth factor | result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    total = 0
    for name in ("A", "B"):
        p = PROBLEMS[name](n=n)
        sparse = p.sparse(p.theta)
        norm = 8.0 * (n + 1) ** 2  # ‖Δ_h‖₂ bound, ν = κ = 1
        op = p.operator(p.theta)
        extra = [p.u0 * np.cos(3.0 * np.arange(n * n) / n) for _ in range(3)]
        extra = [e + 0.01 * rng.standard_normal(n * n) for e in extra]
        for rho in (0.01, 0.3, 1.0, 5.0):
            t = rho / norm
            for order in (0, 1, 3):
                vectors = (p.u0,) + tuple(extra[:order])
                ref = phi_reference(sparse, vectors, t)
                for rtol in rtols:
                    value, result, stats = phimv_stats(
                        kx.KrylovExpm(rtol=rtol), op, vectors, t
                    )
                    total += row(
                        name,
                        f"{rho:g}, {order}, {rtol:.0e}",
                        value,
                        result,
                        stats,
                        ref,
                    )
    return total


# A stiff semilinear 1-D problem: y' = ν D2 y + y - y³ on a periodic grid.
M = 128
DX = 2 * np.pi / M
NU = 0.5  # ‖ν D2‖ = 4ν/dx² ≈ 830


def linear(args):
    struct = jax.ShapeDtypeStruct((M,), jnp.float64)

    def apply(u):
        return NU * (jnp.roll(u, 1) + jnp.roll(u, -1) - 2 * u) / DX**2

    return lx.FunctionLinearOperator(apply, struct)


def nonlinear(t, y, args):
    return y - y**3


@eqx.filter_jit
def integrate(solver, dt, controller):
    x = DX * jnp.arange(M)
    y0 = 0.5 * jnp.sin(x) + 0.3 * jnp.cos(3 * x)
    terms = diffrax.MultiTerm(kx.LinearTerm(linear), diffrax.ODETerm(nonlinear))
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        0.0,
        1.0,
        dt,
        y0,
        stepsize_controller=controller,
        max_steps=4096,
        saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )
    return sol.ys[-1], sol.result, sol.stats["num_steps"], sol.solver_state


def integrations():
    print("\n### Integrations (stiff semilinear, ‖ν D2‖ ≈ 830, T = 1)\n")
    print("| solver | setting | steps | matvecs | rel. error | result |")
    print("|---|---|---|---|---|---|")
    fine = kx.KrylovExpm(rtol=1e-12)
    cases = [
        ("ETDRK4", "dt 1/50", kx.ETDRK4(), 1 / 50, diffrax.ConstantStepSize()),
        ("ETDRK4", "dt 1/400", kx.ETDRK4(), 1 / 400, diffrax.ConstantStepSize()),
        (
            "Exprb43",
            "PID rtol 1e-6",
            kx.Exprb43(rtol=1e-6, atol=1e-9),
            1e-3,
            diffrax.PIDController(rtol=1e-6, atol=1e-9),
        ),
    ]
    ref_y, *_ = integrate(kx.ETDRK4(krylov=fine), 1 / 1600, diffrax.ConstantStepSize())
    ref_y = np.asarray(ref_y)
    total = 0
    for name, setting, solver, dt, controller in cases:
        y, result, steps, matvecs = integrate(solver, dt, controller)
        ok = "ok" if result == diffrax.RESULTS.successful else "FAIL"
        print(
            f"| {name} | {setting} | {int(steps)} | {int(matvecs)} | "
            f"{rel_err(y, ref_y):.1e} | {ok} |"
        )
        total += int(matvecs)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=64, help="grid points per axis")
    parser.add_argument("--rtols", default="1e-4,1e-8")
    args = parser.parse_args()
    rtols = [float(r) for r in args.rtols.split(",")]
    totals = (core(args.grid, rtols), small_steps(args.grid, rtols), integrations())
    print(
        f"\nTotal matvecs: bench_expm problems {totals[0]}, small steps {totals[1]}, "
        f"integrations {totals[2]}"
    )


if __name__ == "__main__":
    main()
