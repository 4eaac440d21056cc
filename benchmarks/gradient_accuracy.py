"""Gradient accuracy for a stiff operator with a parameter per grid node.

Problem: 1-D variable diffusion `u_t = ∂x(e^θ(x) ∂x u)`, Dirichlet ends, n nodes, one
parameter per node, smooth start `u0`, horizon T (‖TA‖ ≈ 430 for n = 200,
T = 0.002); loss `L(θ) = Σ u(T)[::4]²` (every fourth node observed, like sensors).
Reference: `jax.grad` of the dense `jax.scipy.linalg.expm` (float64). Errors are
relative 2-norms of the value `u(T)` and of the whole gradient vector `∇θ L`.

Rows: krylovexp with the default adjoint (`mode="solution"`) and with the paper's
adjoint of the iteration (`mode="approximation"`), through-the-loop differentiation
(`DirectAdjoint`), matfree `funm_arnoldi` (its own custom adjoint) at the smallest
Krylov dimension whose value error is ≤ 1e-6, and Diffrax Tsit5 (PID,
rtol = atol = 1e-8, RecursiveCheckpointAdjoint). Times: medians of warm runs.

Run (from the repository root):

    python benchmarks/gradient_accuracy.py --n 200 --T 0.002
"""

import argparse
import statistics
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax as dfx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
from matfree import decomp, funm  # noqa: E402

import krylovexp as kx  # noqa: E402


def variable_diffusion(theta, u, h):
    kappa = jnp.exp(jnp.concatenate([theta[:1], theta, theta[-1:]]))
    faces = 0.5 * (kappa[1:] + kappa[:-1])
    padded = jnp.concatenate([jnp.zeros(1, u.dtype), u, jnp.zeros(1, u.dtype)])
    flux = faces * (padded[1:] - padded[:-1]) / h
    return (flux[1:] - flux[:-1]) / h


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def rel(x, ref):
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--T", type=float, default=0.002)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, T = args.n, args.T
    h = 1.0 / (n + 1)
    x = jnp.linspace(h, 1 - h, n)
    theta = 0.3 * jnp.sin(3 * x) + 0.1 * jnp.cos(7 * x)
    u0 = jnp.exp(-50 * (x - 0.4) ** 2) + 0.5 * jnp.exp(-80 * (x - 0.7) ** 2)
    structure = jax.ShapeDtypeStruct((n,), jnp.float64)

    def matrix(theta):
        return jax.vmap(lambda e: variable_diffusion(theta, e, h), out_axes=1)(
            jnp.eye(n)
        )

    def observe(u):
        return jnp.sum(u[::4] ** 2)

    dense_value = jax.jit(lambda th: jax.scipy.linalg.expm(T * matrix(th)) @ u0)
    u_ref = dense_value(theta)
    g_ref = jax.jit(jax.grad(lambda th: observe(dense_value(th))))(theta)
    norm = float(jnp.max(jnp.abs(jnp.linalg.eigvalsh(matrix(theta)))))
    grad_norm = float(jnp.linalg.norm(g_ref))
    print(f"n = {n}, T = {T}, ||TA||_2 = {T * norm:.0f}, |grad| = {grad_norm:.3g}")

    rows = []

    def add(name, value_fn):
        value = jax.jit(value_fn)
        grad = jax.jit(jax.grad(lambda th: observe(value_fn(th))))
        v_err = rel(value(theta), u_ref)
        g_err = rel(grad(theta), g_ref)
        rows.append(
            (
                name,
                v_err,
                g_err,
                timed(value, theta, repeats=args.repeats),
                timed(grad, theta, repeats=args.repeats),
            )
        )
        print(f"  done: {name}", flush=True)

    def krylov(theta, **options):
        op = lx.FunctionLinearOperator(
            lambda u: variable_diffusion(theta, u, h), structure, lx.symmetric_tag
        )
        return kx.expmv(op, u0, T, **options)

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
    add(
        "krylovexp arnoldi DirectAdjoint rtol=1e-10",
        lambda th: krylov(th, method="arnoldi", rtol=1e-10, adjoint=kx.DirectAdjoint()),
    )

    def matfree_value(theta, k):
        hessenberg = decomp.hessenberg(k, reortho="full")
        expm = funm.funm_arnoldi(funm.dense_funm_pade_exp(), hessenberg)
        return expm(lambda v, th: T * variable_diffusion(th, v, h), u0, theta)

    k = next(
        k
        for k in range(10, n, 5)
        if rel(jax.jit(matfree_value, static_argnums=1)(theta, k), u_ref) <= 1e-6
    )
    add(f"matfree funm_arnoldi k={k}", lambda th: matfree_value(th, k))

    def tsit5(theta):
        term = dfx.ODETerm(lambda t, u, th: variable_diffusion(th, u, h))
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

    print()
    print(f"| {'method':45s} | value err | grad err | fwd ms | grad ms |")
    print(f"|{'-' * 47}|-----------|----------|--------|---------|")
    for name, v_err, g_err, fwd, grad in rows:
        print(
            f"| {name:45s} | {v_err:9.1e} | {g_err:8.1e} | {fwd:6.1f} | {grad:7.1f} |"
        )
    bad = [r for r in rows if "solution" in r[0] and r[2] > 100 * float(r[0][-5:])]
    if bad:
        raise SystemExit(f"default-adjoint gradient error above 1e-4: {bad}")


if __name__ == "__main__":
    main()
