"""Gradient accuracy for a stiff operator with a parameter per grid node.

Problem (`support.problems.variable_diffusion_problem`): 1-D variable diffusion
`u_t = ∂x(e^θ(x) ∂x u)`, Dirichlet ends, n nodes, one parameter per node, smooth start
`u0`, horizon T (‖TA‖ ≈ 430 for n = 200, T = 0.002); loss `L(θ) = Σ u(T)[::4]²`
(every fourth node observed, like sensors). Reference: `jax.grad` of the dense
`jax.scipy.linalg.expm` (float64). Errors are relative 2-norms of the value `u(T)` and
of the whole gradient vector `∇θ L`.

Methods (`--methods`): `krylovexp` — the default adjoint (`mode="solution"`) and the
paper's adjoint of the iteration (`mode="approximation"`), Lanczos and Arnoldi, at two
tolerances; `direct` — through-the-loop differentiation (`DirectAdjoint`); `matfree` —
`funm_arnoldi` (its own custom adjoint) at the smallest Krylov dimension whose value
error is ≤ 1e-6; `tsit5` — Diffrax Tsit5 (PID, rtol = atol = 1e-8,
RecursiveCheckpointAdjoint). Times: medians of warm runs. The table is also written to
`<out>/table.md`.

Run (from the repository root):

    python benchmarks/gradient_accuracy.py --grid 200 --horizon 0.002
"""

import argparse
import os
import pathlib
import sys

import jax


jax.config.update("jax_enable_x64", True)
# The repository root, for the helpers in `support/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import diffrax as dfx  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.cli import add_common_arguments, resolve_methods  # noqa: E402
from support.measure import rel_err, timed  # noqa: E402
from support.peers import matfree_expm  # noqa: E402
from support.problems import variable_diffusion_problem  # noqa: E402


METHODS = ("krylovexp", "direct", "matfree", "tsit5")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(
        parser, script="gradient_accuracy", methods=METHODS, grid=200, grid_help="nodes"
    )
    parser.add_argument("--horizon", type=float, default=0.002, help="final time T")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    methods = resolve_methods(args.methods, METHODS)
    problem = variable_diffusion_problem(n=args.grid, T=args.horizon)
    n, T, theta, u0 = problem.n, problem.T, problem.theta, problem.u0
    observe = problem.observe

    dense_value = jax.jit(lambda th: jax.scipy.linalg.expm(T * problem.matrix(th)) @ u0)
    u_ref = dense_value(theta)
    g_ref = jax.jit(jax.grad(lambda th: observe(dense_value(th))))(theta)
    norm = float(jnp.max(jnp.abs(jnp.linalg.eigvalsh(problem.matrix(theta)))))
    grad_norm = float(jnp.linalg.norm(g_ref))
    print(f"n = {n}, T = {T}, ||TA||_2 = {T * norm:.0f}, |grad| = {grad_norm:.3g}")

    rows = []

    def add(name, value_fn):
        value = jax.jit(value_fn)
        grad = jax.jit(jax.grad(lambda th: observe(value_fn(th))))
        v_err = rel_err(value(theta), u_ref)
        g_err = rel_err(grad(theta), g_ref)
        _, fwd = timed(value, theta, repeats=args.repeats)
        _, grd = timed(grad, theta, repeats=args.repeats)
        rows.append((name, v_err, g_err, 1e3 * fwd, 1e3 * grd))
        print(f"  done: {name}", flush=True)

    def krylov(theta, **options):
        return kx.expmv(problem.operator(theta), u0, T, **options)

    if "krylovexp" in methods:
        for rtol in (1e-6, 1e-10):
            for method in ("lanczos", "arnoldi"):
                for mode in ("solution", "approximation"):
                    adjoint = kx.KrylovAdjoint(mode=mode)
                    add(
                        f"krylovexp {method} {mode} rtol={rtol:g}",
                        lambda th, m=method, a=adjoint, r=rtol: krylov(
                            th, method=m, adjoint=a, rtol=r
                        ),
                    )
    if "direct" in methods:
        add(
            "krylovexp arnoldi DirectAdjoint rtol=1e-10",
            lambda th: krylov(
                th, method="arnoldi", rtol=1e-10, adjoint=kx.DirectAdjoint()
            ),
        )

    if "matfree" in methods:

        def matfree_value(theta, k):
            return matfree_expm(k)(lambda v, th: T * problem.apply(th, v), u0, theta)

        k = next(
            k
            for k in range(10, n, 5)
            if rel_err(jax.jit(matfree_value, static_argnums=1)(theta, k), u_ref)
            <= 1e-6
        )
        add(f"matfree funm_arnoldi k={k}", lambda th: matfree_value(th, k))

    if "tsit5" in methods:

        def tsit5(theta):
            term = dfx.ODETerm(lambda t, u, th: problem.apply(th, u))
            sol = dfx.diffeqsolve(
                term,
                dfx.Tsit5(),
                0.0,
                T,
                T / 100,
                u0,
                args=theta,
                stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
                max_steps=100_000,
            )
            return sol.ys[-1]

        add("diffrax Tsit5 rtol=1e-8", tsit5)

    lines = [
        f"| {'method':45s} | value err | grad err | fwd ms | grad ms |",
        f"|{'-' * 47}|-----------|----------|--------|---------|",
    ]
    for name, v_err, g_err, fwd, grad in rows:
        lines.append(
            f"| {name:45s} | {v_err:9.1e} | {g_err:8.1e} | {fwd:6.1f} | {grad:7.1f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    bad = [r for r in rows if "solution" in r[0] and r[2] > 100 * float(r[0][-5:])]
    if bad:
        raise SystemExit(f"default-adjoint gradient error above 100 x rtol: {bad}")


if __name__ == "__main__":
    main()
