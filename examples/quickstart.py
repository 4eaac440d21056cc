"""Quickstart: exp(tA)v for a matrix-free 2-D heat equation, and its gradient with
respect to the diffusion coefficient field, checked against dense references.

    python examples/quickstart.py              # 24x24 grid
    python examples/quickstart.py --grid 32 --repeats 10

Exits non-zero if a check fails.
"""

import argparse
import pathlib
import sys

import jax


jax.config.update("jax_enable_x64", True)
# The repository root, for the helpers in `support/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import jax.scipy.linalg as jsl  # noqa: E402
import lineax as lx  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.measure import rel_err, timed  # noqa: E402


def heat_operator(log_kappa, size):
    """Matrix-free `u ↦ ∇·(κ∇u)` on a size×size grid (Dirichlet), κ = exp(log_kappa)
    on cell faces; symmetric, so krylovexp uses Lanczos."""
    h = 1.0 / (size + 1)
    kappa_x = jnp.exp(log_kappa[0])  # (size + 1, size) faces in x
    kappa_y = jnp.exp(log_kappa[1])  # (size, size + 1) faces in y

    def apply(u):
        up = jnp.pad(u, 1)
        flux_x = kappa_x * (up[1:, 1:-1] - up[:-1, 1:-1]) / h
        flux_y = kappa_y * (up[1:-1, 1:] - up[1:-1, :-1]) / h
        return (flux_x[1:] - flux_x[:-1] + flux_y[:, 1:] - flux_y[:, :-1]) / h

    structure = jax.ShapeDtypeStruct((size, size), jnp.float64)
    return lx.FunctionLinearOperator(apply, structure, lx.symmetric_tag)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=int, default=24, help="grid points per side")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    size, t = cfg.grid, 0.02
    grid = jnp.linspace(0, 1, size + 2)[1:-1]
    x, y = jnp.meshgrid(grid, grid, indexing="ij")
    u0 = jnp.exp(-60 * ((x - 0.4) ** 2 + (y - 0.55) ** 2))
    faces = jnp.linspace(0, 1, size + 1)
    log_kappa = (
        0.3 * jnp.sin(6 * faces)[:, None] * jnp.ones((1, size)),
        0.3 * jnp.cos(4 * faces)[None, :] * jnp.ones((size, 1)),
    )
    solver = kx.KrylovExpm(rtol=1e-10)

    @jax.jit
    def forward(log_kappa, u0):
        return solver.expmv(heat_operator(log_kappa, size), u0, t)

    @jax.jit
    def loss(log_kappa, u0):
        return jnp.sum(solver(heat_operator(log_kappa, size), u0, t) ** 2)

    @jax.jit
    def dense_loss(log_kappa, u0):
        matrix = heat_operator(log_kappa, size).as_matrix()
        return jnp.sum((jsl.expm(t * matrix) @ u0.reshape(-1)) ** 2)

    sol = forward(log_kappa, u0)
    matrix = heat_operator(log_kappa, size).as_matrix()
    reference = (jsl.expm(t * matrix) @ u0.reshape(-1)).reshape(size, size)
    value_error = rel_err(sol.value, reference)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    grad_dense = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
    g, g_ref = grad(log_kappa, u0), grad_dense(log_kappa, u0)
    grad_error = rel_err(g, g_ref)
    direction = jax.tree.map(lambda a: jnp.cos(3.0 * a + 1.0), log_kappa)
    eps = 1e-6
    plus = jax.tree.map(lambda a, d: a + eps * d, log_kappa, direction)
    minus = jax.tree.map(lambda a, d: a - eps * d, log_kappa, direction)
    fd = (loss(plus, u0) - loss(minus, u0)) / (2 * eps)
    directional = sum(jnp.vdot(a, d) for a, d in zip(g[0], direction, strict=True))
    fd_error = abs(float(directional - fd)) / abs(float(fd))

    n = size * size
    norm_ta = float(jnp.linalg.norm(t * matrix, 2))
    rows = [
        ("problem", f"2-D heat, n = {n}, ||tA||_2 = {norm_ta:.0f}, Lanczos"),
        ("value rel. error vs dense expm", f"{float(value_error):.2e}"),
        ("gradient rel. error vs autodiff of dense expm", f"{grad_error:.2e}"),
        ("directional gradient vs central FD", f"{fd_error:.2e}"),
        (
            "matvecs / substeps",
            f"{int(sol.stats['num_matvecs'])} / {int(sol.stats['num_substeps'])}",
        ),
        ("result", "successful" if sol.result == kx.RESULTS.successful else "FAILED"),
    ]
    for name, fn in (
        ("forward", forward),
        ("gradient", grad),
        ("dense expm gradient", grad_dense),
    ):
        _, seconds = timed(fn, log_kappa, u0, repeats=cfg.repeats)
        rows.append((f"{name} time [ms]", f"{1e3 * seconds:.2f}"))
    width = max(len(r[0]) for r in rows)
    print("| quantity".ljust(width + 2) + " | value |")
    print("|" + "-" * (width + 2) + "|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    # The default adjoint gives the gradient of the exact solution to the tolerance.
    ok = value_error < 1e-8 and grad_error < 1e-5 and fd_error < 1e-5
    if not ok or sol.result != kx.RESULTS.successful:
        raise SystemExit("quickstart check failed")
    return {"value_error": value_error, "grad_error": grad_error, "fd_error": fd_error}


if __name__ == "__main__":
    main()
