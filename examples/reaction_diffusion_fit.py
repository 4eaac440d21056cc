"""Fit the diffusion and reaction rates of an Allen–Cahn equation to a trajectory,
with a Diffrax solver and with a krylovexp exponential integrator: a one-line swap.

    u_t = D Δu + r (u − u³)   on the periodic unit square,

5-point Laplacian (array slicing). The "existing pipeline" below is ordinary Diffrax:
an `ODETerm` of the vector field, `diffeqsolve` with a `PIDController` and
`SaveAt(ts=...)`, a mean-squared misfit to the observed trajectory, gradients by the
default `RecursiveCheckpointAdjoint`, optax Adam on `(log D, log r)`. The only line
that changes between the fits is the solver:

    solver = diffrax.Tsit5()                    # explicit Runge–Kutta
    solver = kx.Exprb43(rtol=rtol, atol=rtol)   # exponential Rosenbrock (krylovexp)

(`Exprb43` takes the same plain `ODETerm`: it linearises the vector field with
Jacobian-vector products and applies the φ-functions of the Jacobian by Krylov
sweeps. Given the controller's tolerances, it sets its Krylov tolerances to a tenth
of them; without, the core's default relative 1e-8 applies.) With `--methods
tsit5,exprb43,etdrk4` a third fit uses `kx.ETDRK4()` on the semilinear split
`MultiTerm(kx.LinearTerm(D Δ), ODETerm(r (u − u³)))` with `--etdrk4-steps` fixed
steps; `exprb43-lanczos` is `Exprb43` told that the Jacobian is symmetric
(`krylov=kx.KrylovExpm(method="lanczos")`). `etdrk4-fourier` is the same `ETDRK4` fit
in the variables `û = F u` (orthonormal 2-D real FFT): the periodic 5-point Laplacian
is a circulant matrix, diagonal there with the eigenvalues `F(Δ e_0)`, so `D Δ` is a
`lineax.DiagonalLinearOperator` and its φ-functions are exact and elementwise (no
Krylov sweep); the reaction is evaluated in physical space, the misfit too.
`benchmarks/bench_rd_crossover.py` runs these fits over a range of grids.

The observed trajectory comes from Diffrax Dopri8 at rtol 1e-10. float64.
Run `python examples/reaction_diffusion_fit.py` (1-2 minutes on 2 CPU cores).
"""

import argparse
import math
import os
import pathlib
import sys
import time
import warnings

import jax


# Double precision: the reference trajectory and the tolerances need it.
jax.config.update("jax_enable_x64", True)
# The repository root, for the helpers in `support/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.cli import add_common_arguments, resolve_methods  # noqa: E402


# Diffrax warns on every complex state; `etdrk4-fourier`'s is complex on purpose.
warnings.filterwarnings("ignore", message="Complex dtype support in Diffrax")

METHODS = ("tsit5", "exprb43", "exprb43-lanczos", "etdrk4", "etdrk4-fourier")


# ---------------------------------------------------------------------------------
# The model (an ordinary Diffrax vector field).


def laplacian(u, h):
    """Periodic 5-point Laplacian."""
    return (
        jnp.roll(u, 1, 0)
        + jnp.roll(u, -1, 0)
        + jnp.roll(u, 1, 1)
        + jnp.roll(u, -1, 1)
        - 4.0 * u
    ) / h**2


def make_vector_field(h):
    def vector_field(t, u, log_params):
        diffusivity, rate = jnp.exp(log_params)
        return diffusivity * laplacian(u, h) + rate * (u - u**3)

    return vector_field


def to_fourier(u):
    return jnp.fft.rfft2(u, norm="ortho")


def from_fourier(u_hat, size):
    return jnp.fft.irfft2(u_hat, s=(size, size), norm="ortho")


def laplacian_symbol(h):
    """The eigenvalues of the periodic 5-point Laplacian on the real-FFT modes: the
    transform of its impulse response (a circulant matrix is diagonal there)."""
    size = round(1 / h)
    impulse = jnp.zeros((size, size)).at[0, 0].set(1.0)
    return jnp.fft.rfft2(laplacian(impulse, h))


def make_terms(solver_name, h):
    if solver_name == "etdrk4-fourier":
        size = round(1 / h)
        symbol = laplacian_symbol(h)

        def linear(log_params):
            return lx.DiagonalLinearOperator(jnp.exp(log_params[0]) * symbol)

        def reaction_hat(t, u_hat, log_params):
            u = from_fourier(u_hat, size)
            return to_fourier(jnp.exp(log_params[1]) * (u - u**3))

        return diffrax.MultiTerm(kx.LinearTerm(linear), diffrax.ODETerm(reaction_hat))
    if solver_name == "etdrk4":
        # Semilinear split: the linear part D Δ (learned) and the reaction.
        def linear(log_params):
            diffusivity = jnp.exp(log_params[0])
            structure = jax.ShapeDtypeStruct((round(1 / h),) * 2, log_params.dtype)
            return lx.FunctionLinearOperator(
                lambda u: diffusivity * laplacian(u, h), structure, lx.symmetric_tag
            )

        def reaction(t, u, log_params):
            return jnp.exp(log_params[1]) * (u - u**3)

        return diffrax.MultiTerm(kx.LinearTerm(linear), diffrax.ODETerm(reaction))
    return diffrax.ODETerm(make_vector_field(h))


def make_solver(solver_name, rtol):
    # The one line that differs between the Diffrax and the krylovexp pipelines:
    if solver_name == "tsit5":
        return diffrax.Tsit5()
    if solver_name == "exprb43":
        return kx.Exprb43(rtol=rtol, atol=rtol)
    if solver_name == "exprb43-lanczos":
        # The Jacobian D Δ + r (1 - 3u²) is symmetric: Lanczos, O(n) per Krylov step.
        return kx.Exprb43(rtol=rtol, atol=rtol, krylov=kx.KrylovExpm(method="lanczos"))
    if solver_name in ("etdrk4", "etdrk4-fourier"):
        return kx.ETDRK4(rtol=rtol)
    if solver_name == "dopri8":
        return diffrax.Dopri8()
    raise ValueError(f"unknown solver {solver_name!r}")


def simulate(solver_name, log_params, u0, ts, h, rtol, steps=None):
    terms = make_terms(solver_name, h)
    solver = make_solver(solver_name, rtol)
    if steps:
        controller = diffrax.ConstantStepSize()
        dt0 = ts[-1] / steps
    else:
        controller = diffrax.PIDController(rtol=rtol, atol=rtol)
        dt0 = ts[0] / 4
    fourier = solver_name == "etdrk4-fourier"
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        0.0,
        ts[-1],
        dt0,
        to_fourier(u0) if fourier else u0,
        args=log_params,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=controller,
        max_steps=4096,
    )
    ys = sol.ys
    if fourier:
        ys = jax.vmap(lambda y: from_fourier(y, u0.shape[0]))(ys)
    return ys, sol.stats["num_steps"]


# ---------------------------------------------------------------------------------


def initial_condition(key, size, modes=6):
    x = np.arange(size) / size
    k = np.arange(1, modes + 1)
    coef = np.asarray(jax.random.normal(key, (4, modes, modes)))
    decay = 1.0 / (k[:, None] ** 2 + k[None] ** 2)
    cx, sx = np.cos(2 * np.pi * np.outer(k, x)), np.sin(2 * np.pi * np.outer(k, x))
    pairs = [(cx, cx), (cx, sx), (sx, cx), (sx, sx)]
    field = sum(
        np.einsum("kl,ki,lj->ij", c * decay, a, b)
        for c, (a, b) in zip(coef, pairs, strict=True)
    )
    return jnp.asarray(0.8 * field / np.max(np.abs(field)))


def fit(solver_name, data, cfg):
    h, u0, ts, obs = data["h"], data["u0"], data["ts"], data["obs"]
    steps = cfg.etdrk4_steps if solver_name.startswith("etdrk4") else None

    def loss_fn(log_params):
        ys, _ = simulate(solver_name, log_params, u0, ts, h, cfg.rtol, steps)
        return jnp.mean((ys - obs) ** 2) / jnp.mean(obs**2)

    optimiser = optax.adam(cfg.lr)
    params = jnp.asarray(data["init"])
    opt_state = optimiser.init(params)

    def step(params, opt_state):
        loss, grad = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimiser.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tic = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state).compile()
    compile_time = time.perf_counter() - tic
    num_steps = int(
        jax.jit(lambda p: simulate(solver_name, p, u0, ts, h, cfg.rtol, steps)[1])(
            params
        )
    )
    truth = np.asarray(data["truth"])
    losses, errors = [], [float(np.max(np.abs(np.asarray(params) - truth)))]
    failed = None
    elapsed = 0.0
    every = max(1, cfg.iters // 10)
    interactive = sys.stdout.isatty()
    for it in range(1, cfg.iters + 1):
        tic = time.perf_counter()
        try:
            params, opt_state, loss = compiled(params, opt_state)
            loss = float(loss)
        except Exception as e:  # krylovexp raises when a solve fails
            failed = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            loss = float("nan")
        elapsed += time.perf_counter() - tic
        losses.append(loss)
        errors.append(float(np.max(np.abs(np.asarray(params) - truth))))
        if not math.isfinite(loss) and failed is None:
            failed = f"non-finite loss at iteration {it}"
        if it % every == 0 or it == cfg.iters or failed:
            d, r = np.exp(np.asarray(params))
            bar = "#" * int(20 * it / cfg.iters)
            line = (
                f"  {solver_name:<8s} [{bar:<20s}] iter {it:3d}/{cfg.iters}  loss "
                f"{loss:.3e}  D {d:.4e}  r {r:.4f}"
            )
            end = "\n" if (not interactive or it == cfg.iters or failed) else ""
            print(("\r" if interactive else "") + line, end=end, flush=True)
        if failed:
            break
    return {
        "name": solver_name,
        "params": np.exp(np.asarray(params)),
        "losses": np.array(losses),
        "errors": np.array(errors),
        "sec_per_iter": elapsed / max(len(losses), 1),
        "compile": compile_time,
        "num_steps": num_steps,
        "failed": failed,
    }


def make_data(cfg):
    size = cfg.grid
    h = 1.0 / size
    truth = np.log([cfg.diffusivity, cfg.rate])
    init = truth + np.log([cfg.init_factor, 1.0 / cfg.init_factor])
    u0 = initial_condition(jax.random.key(cfg.seed), size)
    ts = jnp.linspace(cfg.horizon / cfg.num_obs, cfg.horizon, cfg.num_obs)
    obs, _ = jax.jit(lambda p: simulate("dopri8", p, u0, ts, h, 1e-10))(
        jnp.asarray(truth)
    )
    norm = 8 * cfg.diffusivity / h**2
    return {
        "h": h,
        "u0": u0,
        "ts": ts,
        "obs": obs,
        "truth": truth,
        "init": init,
        "norm": norm,
    }


def format_table(data, results, cfg):
    d, r = np.exp(data["truth"])
    d0, r0 = np.exp(data["init"])
    lines = [
        f"Allen–Cahn, grid {cfg.grid}x{cfg.grid} (n = {cfg.grid**2}), T = "
        f"{cfg.horizon}, {cfg.num_obs} snapshots, ‖D Δ‖ ≈ {data['norm']:.3g}, rtol "
        f"{cfg.rtol:g}, {cfg.iters} Adam steps; truth D = {d:.4g}, r = {r:.4g}; "
        f"start D = {d0:.4g}, r = {r0:.4g}",
        "",
        "| solver | D fitted | r fitted | max rel. param error | final loss | "
        "solver steps | s/gradient step | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if res["failed"]:
            lines.append(f"| {res['name']} | failed: {res['failed']} | | | | | | |")
            continue
        rel = float(np.max(np.abs(res["params"] / np.exp(data["truth"]) - 1)))
        lines.append(
            f"| {res['name']} | {res['params'][0]:.5g} | {res['params'][1]:.5g} | "
            f"{rel:.2e} | {res['losses'][-1]:.2e} | {res['num_steps']} | "
            f"{res['sec_per_iter']:.3f} | {res['compile']:.1f} |"
        )
    return "\n".join(lines)


def plot(data, results, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    axes[0].imshow(np.asarray(data["u0"]).T, origin="lower", cmap="RdBu_r")
    axes[0].set_title("u(0)", fontsize=9)
    axes[1].imshow(np.asarray(data["obs"][-1]).T, origin="lower", cmap="RdBu_r")
    axes[1].set_title(f"observed u(T), T = {float(data['ts'][-1]):g}", fontsize=9)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    for res in results:
        axes[2].semilogy(res["losses"], label=res["name"])
    axes[2].set_xlabel("Adam step")
    axes[2].set_ylabel("relative misfit")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(outdir, "fit.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        p,
        script="reaction_diffusion_fit",
        methods=METHODS,
        default_methods=("tsit5", "exprb43"),
        grid=48,
    )
    p.add_argument("--horizon", type=float, default=1.0)
    p.add_argument("--num-obs", type=int, default=5, help="snapshots in (0, T]")
    p.add_argument("--diffusivity", type=float, default=5e-3, help="true D")
    p.add_argument("--rate", type=float, default=4.0, help="true r")
    p.add_argument(
        "--init-factor", type=float, default=2.0, help="start at (f D, r / f)"
    )
    p.add_argument("--iters", type=int, default=40, help="Adam steps")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rtol", type=float, default=1e-6, help="PID tolerance")
    p.add_argument("--etdrk4-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    names = resolve_methods(cfg.methods, METHODS)
    os.makedirs(cfg.out, exist_ok=True)
    print(f"reaction_diffusion_fit: float64; output in {cfg.out}/")
    data = make_data(cfg)
    results = [fit(name, data, cfg) for name in names]
    failures = [f"{r['name']}: {r['failed']}" for r in results if r["failed"]]
    table = format_table(data, results, cfg)
    print("\n" + table + "\n")
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("wrote", plot(data, results, cfg.out))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
    return {
        "data": data,
        "results": {r["name"]: r for r in results},
        "failures": failures,
    }


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out["failures"] else 0)
