"""Recover a heat conductivity field from a few noisy temperature sensors.

    u_t = ∇·(κ(x) ∇u)   on [0, 1]², u = 0 on the boundary,   κ = exp(θ(x)),

discretised by cell-centred finite volumes (face conductivities are the arithmetic
means of the neighbouring cells), applied matrix-free with array slicing. The operator
is symmetric negative definite; it is tagged `lineax.symmetric_tag`, so krylovexp uses
Lanczos. A few known initial temperature fields (Gaussian bumps) are released; sensors
on a coarse lattice record the temperature at a few times, with Gaussian noise. The
unknown is θ on the whole grid (one value per cell), regularised by a smoothness prior
`λ Σ |∇θ|²`; it is fitted with optax Adam from θ ≡ log κ̄ (the mean of the truth).

All observation times come from one krylovexp sweep (`t` is a 1-D array). The same
fit is run with Diffrax Kvaerno5 (implicit, PID steps) and Tsit5 (explicit, PID
steps), both at the same tolerance, with `SaveAt(ts=...)` and the default
`RecursiveCheckpointAdjoint`; the table reports the time each needs to reach a given
reconstruction error. float64.

Run `python examples/heat_inverse.py` (a few minutes on 2 CPU cores).
"""

import argparse
import math
import os
import pathlib
import sys
import time

import jax


# Double precision: the comparison is run at tolerances below single precision.
jax.config.update("jax_enable_x64", True)
# The repository root, for the helpers in `support/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.cli import add_common_arguments, comma_list, resolve_methods  # noqa: E402
from support.fields import smooth_fields  # noqa: E402


METHODS = ("krylovexp-lanczos", "diffrax-kvaerno5", "diffrax-tsit5")


# ---------------------------------------------------------------------------------
# The PDE.


def diffusion(u, kappa, h):
    """`∇·(κ∇u)` with `u = 0` outside the grid (the boundary face uses the cell's κ)."""
    up = jnp.pad(u, 1)
    kp = jnp.pad(kappa, 1, mode="edge")
    kx_face = 0.5 * (kp[1:, 1:-1] + kp[:-1, 1:-1])  # faces between rows i-1 and i
    ky_face = 0.5 * (kp[1:-1, 1:] + kp[1:-1, :-1])
    dx = up[1:, 1:-1] - up[:-1, 1:-1]  # u_i - u_{i-1}, shape (n+1, n)
    dy = up[1:-1, 1:] - up[1:-1, :-1]
    flux_x = kx_face * dx
    flux_y = ky_face * dy
    return (flux_x[1:] - flux_x[:-1] + flux_y[:, 1:] - flux_y[:, :-1]) / h**2


def heat_operator(theta, h):
    kappa = jnp.exp(theta)
    structure = jax.ShapeDtypeStruct(theta.shape, theta.dtype)
    return lx.FunctionLinearOperator(
        lambda u: diffusion(u, kappa, h), structure, lx.symmetric_tag
    )


def bumps(size, centres, width):
    x = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(x, x, indexing="ij")
    return np.stack(
        [
            np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
            for cx, cy in centres
        ]
    )


# ---------------------------------------------------------------------------------
# Forward models: (θ, u0) -> temperatures at all observation times, (len(t), n, n).


def make_forward(name, h, times, rtol, cfg_max_steps=1024):
    times = jnp.asarray(times)
    if name == "krylovexp-lanczos":
        solver = kx.KrylovExpm(rtol=rtol, max_substeps=64)  # Lanczos via the tag

        def forward(theta, u0):
            return solver.expmv(heat_operator(theta, h), u0, times).value

        return forward

    ode_solver = diffrax.Kvaerno5() if name == "diffrax-kvaerno5" else diffrax.Tsit5()
    term = diffrax.ODETerm(lambda t, u, theta: diffusion(u, jnp.exp(theta), h))

    def forward(theta, u0):
        sol = diffrax.diffeqsolve(
            term,
            ode_solver,
            0.0,
            times[-1],
            times[0] / 10,
            u0,
            args=theta,
            saveat=diffrax.SaveAt(ts=times),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol * 1e-3),
            max_steps=cfg_max_steps,
        )
        return sol.ys

    return forward


def batched(name, forward):
    """Loop over the experiments with `jax.lax.map`. (Under `jax.vmap` the adaptive
    loops of both krylovexp and Diffrax's implicit Kvaerno5 run every data-dependent
    branch for every batch element, which is far slower here than a loop.)"""
    del name
    return lambda theta, u0s: jax.lax.map(lambda u0: forward(theta, u0), u0s)


# ---------------------------------------------------------------------------------


def make_problem(cfg):
    n = cfg.grid
    h = 1.0 / n
    key = jax.random.key(cfg.seed)
    k_theta, k_noise = jax.random.split(key)
    theta_true = (
        math.log(cfg.kappa_mean)
        + cfg.contrast * smooth_fields(k_theta, 1, n, length_scale=0.35, modes=8)[0]
    )
    rng = np.random.default_rng(cfg.seed)
    centres = rng.uniform(0.25, 0.75, size=(cfg.num_sources, 2))
    u0s = jnp.asarray(bumps(n, centres, 0.08))
    times = np.asarray(cfg.times)
    # Sensors on a coarse lattice of cells.
    idx = np.round(np.linspace(0, n - 1, cfg.sensors + 2)[1:-1]).astype(int)
    sx, sy = np.meshgrid(idx, idx, indexing="ij")
    sensors = (jnp.asarray(sx.ravel()), jnp.asarray(sy.ravel()))
    reference = jax.jit(
        batched(
            "krylovexp-lanczos",
            make_forward("krylovexp-lanczos", h, times, cfg.ref_rtol),
        )
    )
    clean = reference(jnp.asarray(theta_true), u0s)[:, :, sensors[0], sensors[1]]
    sigma = cfg.noise * float(jnp.max(jnp.abs(clean)))
    obs = clean + sigma * jax.random.normal(k_noise, clean.shape)
    return {
        "n": n,
        "h": h,
        "theta_true": theta_true,
        "theta_init": np.full((n, n), math.log(cfg.kappa_mean)),
        "u0s": u0s,
        "times": times,
        "sensors": sensors,
        "obs": obs,
        "sigma": sigma,
        "norm": float(times[-1] * 8 * np.exp(theta_true).max() / h**2),
    }


def theta_error(theta, theta_true):
    """Relative error of the recovered κ = exp(θ)."""
    k, kt = np.exp(np.asarray(theta)), np.exp(theta_true)
    return float(np.linalg.norm(k - kt) / np.linalg.norm(kt - kt.mean()))


def misfit_fn(forward, problem):
    """The data misfit `½ mean(((u(sensors, times) − obs) / σ)²)` for a forward map."""
    sensors, obs, sigma = problem["sensors"], problem["obs"], problem["sigma"]

    def misfit(theta):
        pred = forward(theta, problem["u0s"])[:, :, sensors[0], sensors[1]]
        return 0.5 * jnp.mean(((pred - obs) / sigma) ** 2)

    return misfit


def misfit_gradient(name, problem, rtol):
    """∇θ of the misfit at the starting θ, for the gradient-error column."""
    forward = batched(name, make_forward(name, problem["h"], problem["times"], rtol))
    grad = jax.jit(jax.grad(misfit_fn(forward, problem)))
    return np.asarray(grad(jnp.asarray(problem["theta_init"])))


def fit(name, problem, cfg):
    forward = batched(
        name, make_forward(name, problem["h"], problem["times"], cfg.rtol)
    )
    misfit_of = misfit_fn(forward, problem)
    h = problem["h"]

    def loss_fn(theta):
        misfit = misfit_of(theta)
        gx = jnp.diff(theta, axis=0) / h
        gy = jnp.diff(theta, axis=1) / h
        prior = cfg.smoothness * (jnp.sum(gx**2) + jnp.sum(gy**2)) * h**2
        return misfit + prior, misfit

    optimiser = optax.adam(cfg.lr)
    theta = jnp.asarray(problem["theta_init"])
    opt_state = optimiser.init(theta)

    def step(theta, opt_state):
        (loss, misfit), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta)
        updates, opt_state = optimiser.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, loss, misfit

    # How far this method's gradient is from the solution's, at the start.
    start_grad = misfit_gradient(name, problem, cfg.rtol)
    grad_ref = problem["grad_ref"]
    grad_error = float(np.linalg.norm(start_grad - grad_ref) / np.linalg.norm(grad_ref))

    tic = time.perf_counter()
    compiled = jax.jit(step).lower(theta, opt_state).compile()
    compile_time = time.perf_counter() - tic
    errors = [theta_error(theta, problem["theta_true"])]
    losses, clock = [], [0.0]
    failed = None
    interactive = sys.stdout.isatty()
    every = max(1, cfg.iters // 10)
    elapsed = 0.0
    for it in range(1, cfg.iters + 1):
        tic = time.perf_counter()
        try:
            theta, opt_state, loss, misfit = compiled(theta, opt_state)
            loss = float(loss)
        except Exception as e:  # krylovexp raises when a solve fails
            failed = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            loss = float("nan")
        elapsed += time.perf_counter() - tic
        losses.append(loss)
        errors.append(theta_error(theta, problem["theta_true"]))
        clock.append(elapsed)
        if not math.isfinite(loss) and failed is None:
            failed = f"non-finite loss at iteration {it}"
        if it % every == 0 or it == cfg.iters or failed:
            bar = "#" * int(20 * it / cfg.iters)
            line = (
                f"  {name:<18s} [{bar:<20s}] iter {it:4d}/{cfg.iters}  loss "
                f"{loss:.3e}  κ error {errors[-1]:.3f}"
            )
            end = "\n" if (not interactive or it == cfg.iters or failed) else ""
            print(("\r" if interactive else "") + line, end=end, flush=True)
        if failed:
            break
    return {
        "name": name,
        "theta": np.asarray(theta),
        "losses": np.array(losses),
        "errors": np.array(errors),
        "clock": np.array(clock),
        "compile": compile_time,
        "sec_per_iter": elapsed / max(len(losses), 1),
        "grad_error": grad_error,
        "failed": failed,
    }


def time_to(result, target):
    hit = np.nonzero(result["errors"] <= target)[0]
    if len(hit) == 0:
        return None, None
    return int(hit[0]), float(result["clock"][hit[0]])


def format_table(problem, results, target, cfg):
    lines = [
        f"grid {problem['n']}x{problem['n']}, {len(problem['u0s'])} sources, "
        f"{problem['obs'].shape[-1]} sensors x {len(problem['times'])} times, "
        f"noise {cfg.noise:.0%}, ‖TA‖ ≈ {problem['norm']:.3g}, rtol {cfg.rtol:g}; "
        f"initial κ error {results[0]['errors'][0]:.3f}, target {target:.3f}",
        "",
        "| method | final κ error | final loss | gradient error at start | s/iter |"
        " compile s | iters to target | time to target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["failed"]:
            lines.append(f"| {r['name']} | failed: {r['failed']} | | | | | | |")
            continue
        it, sec = time_to(r, target)
        reach = ("not reached", "–") if it is None else (str(it), f"{sec:.2f} s")
        lines.append(
            f"| {r['name']} | {r['errors'][-1]:.3f} | {r['losses'][-1]:.3e} | "
            f"{r['grad_error']:.1e} | {r['sec_per_iter']:.4f} | {r['compile']:.1f} | "
            f"{reach[0]} | {reach[1]} |"
        )
    return "\n".join(lines)


def plot(problem, results, target, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("true κ", problem["theta_true"])] + [
        (r["name"], r["theta"]) for r in results if not r["failed"]
    ]
    kt = np.exp(problem["theta_true"])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.7))
    for ax, (title, theta) in zip(axes, panels, strict=False):
        im = ax.imshow(
            np.exp(theta).T,
            origin="lower",
            extent=(0, 1, 0, 1),
            vmin=kt.min(),
            vmax=kt.max(),
            cmap="magma",
        )
        n = problem["n"]
        sx, sy = (np.asarray(s) for s in problem["sensors"])
        ax.plot((sx + 0.5) / n, (sy + 0.5) / n, "c.", ms=3)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes[:-1]), shrink=0.8, label="κ")
    ax = axes[-1]
    for r in results:
        ax.semilogx(np.maximum(r["clock"], 1e-3), r["errors"], label=r["name"])
    ax.axhline(target, color="k", ls=":", lw=0.8)
    ax.set_xlabel("wall time (s, after compile)", fontsize=8)
    ax.set_ylabel("κ relative error", fontsize=8)
    ax.legend(fontsize=6)
    path = os.path.join(outdir, "kappa.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        p, script="heat_inverse", methods=METHODS, grid=16, grid_help="cells per side"
    )
    p.add_argument("--sensors", type=int, default=4, help="sensors per side")
    p.add_argument("--num-sources", type=int, default=3, help="experiments")
    p.add_argument(
        "--times",
        type=comma_list(float),
        default=[0.005, 0.01, 0.02, 0.04],
        help="observation times",
    )
    p.add_argument("--noise", type=float, default=0.01, help="relative noise level")
    p.add_argument("--kappa-mean", type=float, default=1.0)
    p.add_argument("--contrast", type=float, default=0.7, help="amplitude of θ")
    p.add_argument("--smoothness", type=float, default=1e-2, help="prior weight λ")
    p.add_argument("--iters", type=int, default=60, help="Adam iterations")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rtol", type=float, default=1e-6, help="all solvers")
    p.add_argument("--ref-rtol", type=float, default=1e-10)
    p.add_argument(
        "--target",
        type=float,
        default=0.0,
        help="κ error for the time-to-target column (0: 1.1 x the best final error)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    methods = resolve_methods(cfg.methods, METHODS)
    os.makedirs(cfg.out, exist_ok=True)
    print(f"heat_inverse: float64; output in {cfg.out}/")
    problem = make_problem(cfg)
    # Reference gradient of the misfit at the start: krylovexp at the reference rtol.
    problem["grad_ref"] = misfit_gradient("krylovexp-lanczos", problem, cfg.ref_rtol)
    results = [fit(name, problem, cfg) for name in methods]
    failures = [f"{r['name']}: {r['failed']}" for r in results if r["failed"]]
    finals = [r["errors"][-1] for r in results if not r["failed"]]
    target = cfg.target or (1.1 * min(finals) if finals else 0.0)
    table = format_table(problem, results, target, cfg)
    print("\n" + table + "\n")
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("wrote", plot(problem, results, target, cfg.out))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
    return {
        "problem": problem,
        "results": {r["name"]: r for r in results},
        "target": target,
        "failures": failures,
    }


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out["failures"] else 0)
