"""Learn the wave speed ω(x) of a 2-D wave equation from snapshots, five ways.

The paper's PDE study (Krämer, Moreno-Muñoz, Roy & Hauberg, "Gradients of functions
of large matrices", NeurIPS 2024, Table 4), reproduced at CPU scale and extended by a
harder regime:

    u_tt = ω(x)² Δu   on [0, 1]², Neumann boundaries,

in first-order form `w' = A w`, `w = (u, u_t)`, `A = [[0, I], [ω² Δ, 0]]`, with the
target `w(T) = exp(T A) w_0`. The Laplacian is the cell-centred 5-point stencil with
mirrored ghost cells (array slicing, matrix-free; symmetric negative semidefinite).
The unknown ω is an Equinox MLP of the grid coordinates, `ω = ω₀ exp(MLP(x))`; the
truth is a smooth random field. Initial conditions are smooth random fields (random
cosine series with a Gaussian spectrum, i.e. GP samples with Neumann boundaries);
`u_t(0) = 0`. Targets come from a tight-tolerance krylovexp solve (`rtol=1e-10`),
cross-checked against Diffrax Dopri8 at `rtol=1e-10`.

Methods (same data, model, optimiser, seed):

- `kx-fixed-10`: krylovexp at the paper's fixed Krylov depth 10, one substep, plain
  Galerkin approximation, custom Arnoldi adjoint;
- `kx-adaptive`: krylovexp with its error estimate and substepping at `--rtol`;
- `dopri5-backsolve`: Diffrax Dopri5, 3 fixed steps, `BacksolveAdjoint`;
- `tsit5-checkpoint`: Diffrax Tsit5, 3 fixed steps, `RecursiveCheckpointAdjoint`;
- `matfree-10`: matfree 0.6.3 `funm_arnoldi` (depth 10, full reorthogonalisation,
  Padé exponential, its custom adjoint).

Two regimes: `mild` (‖A‖₂ ≈ 5, the paper's) and `hard` (‖TA‖₂ ≈ 300 by default: a
larger wave speed), where the fixed-depth and 3-step methods are no longer accurate.

Run `python examples/wave_inverse.py` (float64; about 3-4 minutes on 2 CPU cores);
`--grid 128 --num-ics 256 --epochs 3000 --lr 2e-4` is the paper's size.
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


# Double precision: the reference solves and the accuracy comparison need it.
jax.config.update("jax_enable_x64", True)
# The repository root, for the helpers in `support/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.cli import add_common_arguments, comma_list, resolve_methods  # noqa: E402
from support.fields import smooth_fields  # noqa: E402
from support.measure import compiled_memory_mb  # noqa: E402
from support.peers import matfree_expm  # noqa: E402


METHODS = (
    "kx-fixed-10",
    "kx-adaptive",
    "dopri5-backsolve",
    "tsit5-checkpoint",
    "matfree-10",
)
FIXED_DEPTH = 10  # the paper's Krylov depth
FIXED_STEPS = 3  # the paper's number of Diffrax steps


# ---------------------------------------------------------------------------------
# The PDE.


def neumann_laplacian(u, h):
    """Cell-centred 5-point Laplacian with homogeneous Neumann boundaries."""
    up = jnp.pad(u, 1, mode="edge")
    return (
        up[2:, 1:-1] + up[:-2, 1:-1] + up[1:-1, 2:] + up[1:-1, :-2] - 4.0 * u
    ) / h**2


def wave_matvec(w, omega2, h):
    """`A w` for `w = (u, u_t)` stacked on axis 0: `(u_t, ω² Δu)`."""
    return jnp.stack([w[1], omega2 * neumann_laplacian(w[0], h)])


def wave_operator(omega2, h, matvec=wave_matvec):
    structure = jax.ShapeDtypeStruct((2,) + omega2.shape, omega2.dtype)
    return lx.FunctionLinearOperator(lambda w: matvec(w, omega2, h), structure)


def operator_norms(omega2, h, iters=200):
    """‖A‖₂ (power iteration on AᵀA) and the spectral radius of A, which is
    `sqrt(λ_max(ω²(−Δ)))` (eigenvalues ±i sqrt(λ))."""
    n = omega2.shape
    key = jax.random.key(1)
    x = jax.random.normal(key, (2,) + n)
    mv = jax.jit(lambda w: wave_matvec(w, omega2, h))
    rmv = jax.jit(jax.linear_transpose(mv, x))

    def power(apply, x):
        for _ in range(iters):
            y = apply(x)
            x = y / jnp.linalg.norm(y)
        return float(jnp.vdot(x, apply(x)))

    norm2 = math.sqrt(power(lambda z: rmv(mv(z))[0], x))
    u = jax.random.normal(key, n)
    lam = power(lambda z: -omega2 * neumann_laplacian(z, h), u)
    return norm2, math.sqrt(lam)


def coordinates(size):
    x = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(x, x, indexing="ij")
    return jnp.asarray(np.stack([xx.ravel(), yy.ravel()], axis=1) * 2.0 - 1.0)


class Speed(eqx.Module):
    """ω(x) = ω₀ exp(MLP(x)) on the grid; the last layer starts at zero (ω ≡ ω₀)."""

    mlp: eqx.nn.MLP
    omega0: float = eqx.field(static=True)

    def __init__(self, key, width, depth, omega0):
        mlp = eqx.nn.MLP(2, 1, width, depth, activation=jnp.tanh, key=key)
        last = mlp.layers[-1]
        last = eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            last,
            (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)),
        )
        self.mlp = eqx.tree_at(lambda m: m.layers[-1], mlp, last)
        self.omega0 = omega0

    def __call__(self, coords, size):
        out = jax.vmap(self.mlp)(coords)[:, 0]
        return self.omega0 * jnp.exp(out).reshape(size, size)


# ---------------------------------------------------------------------------------
# The five solvers: each maps (ω² grid, w0) to w(T) for one initial condition.


def make_solver(name: str, h: float, horizon: float, rtol: float, matvec) -> Callable:
    if name == "kx-fixed-10":
        solver = kx.KrylovExpm(
            method="arnoldi",
            min_krylov_dim=FIXED_DEPTH,
            max_krylov_dim=FIXED_DEPTH,
            rtol=1e6,
            corrected=False,
            max_substeps=1,
            # The paper's algorithm: the adjoint of the Arnoldi iteration, the exact
            # derivative of the depth-10 approximation (as matfree computes it).
            adjoint=kx.KrylovAdjoint(mode="approximation"),
        )

        def solve(omega2, w0):
            return solver.expmv(wave_operator(omega2, h, matvec), w0, horizon).value

    elif name in ("kx-adaptive", "reference"):
        solver = kx.KrylovExpm(method="arnoldi", rtol=rtol, max_substeps=64)

        def solve(omega2, w0):
            return solver.expmv(wave_operator(omega2, h, matvec), w0, horizon).value

    elif name in ("dopri5-backsolve", "tsit5-checkpoint"):
        if name == "dopri5-backsolve":
            ode_solver = diffrax.Dopri5()
            adjoint = diffrax.BacksolveAdjoint(solver=diffrax.Dopri5())
        else:
            ode_solver = diffrax.Tsit5()
            adjoint = diffrax.RecursiveCheckpointAdjoint()
        term = diffrax.ODETerm(lambda t, w, omega2: matvec(w, omega2, h))

        def solve(omega2, w0):
            sol = diffrax.diffeqsolve(
                term,
                ode_solver,
                0.0,
                horizon,
                horizon / FIXED_STEPS,
                w0,
                args=omega2,
                stepsize_controller=diffrax.ConstantStepSize(),
                adjoint=adjoint,
                saveat=diffrax.SaveAt(t1=True),
                max_steps=FIXED_STEPS + 1,
            )
            return sol.ys[0]

    elif name == "matfree-10":
        funm = matfree_expm(FIXED_DEPTH)

        def scaled(w, omega2):
            return horizon * matvec(w, omega2, h)

        def solve(omega2, w0):
            return funm(scaled, w0, omega2)

    elif name == "dopri8-reference":
        term = diffrax.ODETerm(lambda t, w, omega2: matvec(w, omega2, h))

        def solve(omega2, w0):
            sol = diffrax.diffeqsolve(
                term,
                diffrax.Dopri8(),
                0.0,
                horizon,
                horizon / 16,
                w0,
                args=omega2,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol * 1e-2),
                saveat=diffrax.SaveAt(t1=True),
                max_steps=100_000,
            )
            return sol.ys[0]

    else:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    return solve


def relative_mse(pred, target):
    num = jnp.sum((pred - target) ** 2, axis=(1, 2, 3))
    den = jnp.sum(target**2, axis=(1, 2, 3))
    return jnp.mean(num / den)


# ---------------------------------------------------------------------------------
# Training.


class Counter:
    def __init__(self):
        self.count = 0

    def tick(self, w):
        self.count += 1 if w.ndim == 3 else int(np.prod(w.shape[:-3]))

    def matvec(self, w, omega2, h):
        jax.debug.callback(self.tick, w)
        return wave_matvec(w, omega2, h)


def progress(label, epoch, epochs, loss, interactive):
    width = 20
    filled = int(width * epoch / epochs)
    bar = "#" * filled + "." * (width - filled)
    line = f"  {label:<18s} [{bar}] epoch {epoch:5d}/{epochs}  loss {loss:.3e}"
    if interactive:
        end = "\n" if epoch == epochs else ""
        print("\r" + line, end=end, flush=True)
    else:
        print(line, flush=True)


def batch_solver(name, solve):
    """Map a one-initial-condition solve over a batch (`jax.vmap`; krylovexp runs its
    adaptive loops one element after another on CPU and the batch in one loop on
    accelerators, `KrylovExpm(batching="auto")`)."""
    del name
    return jax.vmap(solve, in_axes=(None, 0))


def in_dtype(tree, dtype):
    """The floating-point arrays of `tree` in `dtype`."""

    def cast(x):
        if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def training_setup(name, problem, cfg):
    """The model's parameters, its static part, `ω(params)`, the training loss, the
    batched solve and the training data, all in `--dtype` (the data are made in
    float64 and rounded). In float32 krylovexp runs at its default tolerance."""
    dtype = jnp.dtype(cfg.dtype)
    rtol = cfg.rtol if dtype == jnp.float64 else None
    h, size = problem["h"], problem["size"]
    coords = in_dtype(problem["coords"], dtype)
    solve = batch_solver(name, make_solver(name, h, cfg.horizon, rtol, wave_matvec))
    model = Speed(jax.random.key(cfg.seed + 1), cfg.width, cfg.depth, problem["omega0"])
    params, static = eqx.partition(in_dtype(model, dtype), eqx.is_array)

    def omega_of(params):
        return eqx.combine(params, static)(coords, size)

    def loss_fn(params, w0s, targets, solve=solve):
        return relative_mse(solve(omega_of(params) ** 2, w0s), targets)

    data = in_dtype((problem["x_train"], problem["y_train"]), dtype)
    return params, static, omega_of, loss_fn, solve, rtol, data


def train(name, problem, cfg) -> dict[str, Any]:
    h = problem["h"]
    params, _, omega_of, loss_fn, solve, rtol, data = training_setup(name, problem, cfg)
    optimiser = optax.adam(cfg.lr)
    opt_state = optimiser.init(params)

    def train_step(params, opt_state, w0s, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, w0s, targets)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    x_train, y_train = data
    batch = min(cfg.batch_size or len(x_train), len(x_train))
    steps = len(x_train) // batch
    tic = time.perf_counter()
    try:
        compiled = (
            jax.jit(train_step)
            .lower(params, opt_state, x_train[:batch], y_train[:batch])
            .compile()
        )
    except Exception as e:  # noqa: BLE001 - record the method as failed, go on
        failed = f"compile: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(f"  {name:<18s} FAILED to compile: {failed}")
        nan = float("nan")
        return {
            "name": name,
            "losses": np.array([]),
            "omega": None,
            **dict.fromkeys(
                ("rmse", "test_own", "test_exact", "solver_error", "sec_per_epoch"),
                nan,
            ),
            "median_sec_per_epoch": nan,
            "compile": nan,
            "matvecs": None,
            "peak_mb": None,
            "failed": failed,
        }
    compile_time = time.perf_counter() - tic
    peak_mb = compiled_memory_mb(compiled)

    # Matvecs of one gradient step (forward, plus those inside VJPs and recomputed
    # forward passes), counted once with a callback in the matvec (a second
    # compilation; `--no-count-matvecs` skips it).
    matvecs_per_epoch = None
    if cfg.count_matvecs:
        counter = Counter()
        counted = batch_solver(
            name, make_solver(name, h, cfg.horizon, rtol, counter.matvec)
        )
        jax.block_until_ready(
            jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(p, x, y, counted)))(
                params, x_train[:batch], y_train[:batch]
            )
        )
        matvecs_per_epoch = counter.count * steps

    rng = np.random.default_rng(cfg.seed)
    losses = []
    failed = None
    interactive = sys.stdout.isatty()
    epochs = problem["epochs"]
    every = max(1, epochs // 10)
    epoch_times = []
    tic = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_tic = time.perf_counter()
        order = rng.permutation(len(x_train))
        epoch_loss = 0.0
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            try:
                params, opt_state, loss = compiled(
                    params, opt_state, x_train[idx], y_train[idx]
                )
                loss = float(loss)
            except Exception as e:  # krylovexp raises when a solve fails
                failed = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                loss = float("nan")
            epoch_loss += loss / steps
        epoch_times.append(time.perf_counter() - epoch_tic)
        losses.append(epoch_loss)
        if not math.isfinite(epoch_loss) and failed is None:
            failed = f"non-finite loss at epoch {epoch}"
        if epoch % every == 0 or epoch == epochs or failed:
            progress(name, epoch, epochs, epoch_loss, interactive)
        if failed:
            if interactive:
                print()
            break
    train_time = time.perf_counter() - tic
    epochs_run = len(losses)

    omega = omega_of(params)
    omega_np = np.asarray(omega)
    omega0 = problem["omega0"]
    rmse = float(np.sqrt(np.mean((omega_np - problem["omega_true"]) ** 2)) / omega0)
    forward = jax.jit(solve)
    x_test, y_test = problem["x_test"], problem["y_test"]
    x_own = x_test.astype(omega.dtype)
    test_own = float(relative_mse(forward(omega**2, x_own), y_test))
    omega64 = omega.astype(x_test.dtype)
    test_exact = float(relative_mse(problem["reference"](omega64**2, x_test), y_test))
    # Forward error of the method itself at the true ω.
    truth2 = jnp.asarray(problem["omega_true"], omega.dtype) ** 2
    solver_error = float(relative_mse(forward(truth2, x_own), y_test))
    ok = failed is None and all(math.isfinite(v) for v in (test_own, test_exact, rmse))
    if failed is None and not ok:
        failed = "non-finite test loss or parameters"
    return {
        "name": name,
        "losses": np.array(losses),
        "omega": omega_np,
        "rmse": rmse,
        "test_own": test_own,
        "test_exact": test_exact,
        "solver_error": solver_error,
        "sec_per_epoch": train_time / max(epochs_run, 1),
        "median_sec_per_epoch": float(np.median(epoch_times))
        if epoch_times
        else float("nan"),
        "compile": compile_time,
        "matvecs": matvecs_per_epoch,
        "peak_mb": peak_mb,
        "failed": failed,
    }


def make_problem(cfg, norm_target, label):
    size = cfg.grid
    h = 1.0 / size
    key = jax.random.key(cfg.seed)
    k_omega, k_ics = jax.random.split(key)
    g = smooth_fields(k_omega, 1, size, 0.3, 8)[0]
    shape = np.exp(cfg.contrast * g)  # ω_true / ω₀
    # Scale ω₀ so that ‖A‖₂ ≈ norm_target / T (ω² enters linearly in the big block).
    unit_norm, _ = operator_norms(jnp.asarray(shape**2), h)
    omega0 = math.sqrt(norm_target / cfg.horizon / unit_norm)
    omega_true = omega0 * shape
    norm2, radius = operator_norms(jnp.asarray(omega_true**2), h)

    u0 = smooth_fields(k_ics, cfg.num_ics, size, cfg.ic_length_scale, cfg.ic_modes)
    w0 = np.stack([u0, np.zeros_like(u0)], axis=1)  # (num, 2, size, size)
    w0 = jnp.asarray(w0)
    tic = time.perf_counter()
    reference = jax.jit(
        batch_solver(
            "reference",
            make_solver("reference", h, cfg.horizon, cfg.ref_rtol, wave_matvec),
        )
    )
    targets = jax.block_until_ready(reference(jnp.asarray(omega_true) ** 2, w0))
    ref_time = time.perf_counter() - tic
    # Cross-check the reference on two initial conditions with Diffrax Dopri8.
    cross = float("nan")
    if cfg.cross_check:
        dopri8 = make_solver(
            "dopri8-reference", h, cfg.horizon, cfg.ref_rtol, wave_matvec
        )
        omega2_true = jnp.asarray(omega_true) ** 2
        check = jax.jit(jax.vmap(lambda w: dopri8(omega2_true, w)))(w0[:2])
        cross = float(jnp.sqrt(relative_mse(check, targets[:2])))
    num_test = max(1, round(cfg.num_ics * cfg.test_fraction))
    num_train = cfg.num_ics - num_test
    print(
        f"\n== regime '{label}': grid {size}x{size} (n = {2 * size * size}), "
        f"T = {cfg.horizon}, ω₀ = {omega0:.4g}, ‖TA‖₂ = {cfg.horizon * norm2:.3g}, "
        f"spectral radius of TA = {cfg.horizon * radius:.3g}"
    )
    print(
        f"   {num_train} train / {num_test} test initial conditions; reference: "
        f"krylovexp rtol={cfg.ref_rtol:g} ({ref_time:.1f} s)"
        + (
            f", vs Diffrax Dopri8 rtol={cfg.ref_rtol:g}: relative difference "
            f"{cross:.1e}"
            if cfg.cross_check
            else ""
        )
    )
    return {
        "label": label,
        "epochs": cfg.hard_epochs
        if label == "hard" and cfg.hard_epochs
        else cfg.epochs,
        "size": size,
        "h": h,
        "coords": coordinates(size),
        "omega0": omega0,
        "omega_true": omega_true,
        "norm": cfg.horizon * norm2,
        "radius": cfg.horizon * radius,
        "x_train": w0[:num_train],
        "y_train": targets[:num_train],
        "x_test": w0[num_train:],
        "y_test": targets[num_train:],
        "cross_check": cross,
        "reference": reference,
        "rmse_init": float(np.sqrt(np.mean((omega0 - omega_true) ** 2)) / omega0),
    }


# ---------------------------------------------------------------------------------
# Reporting.


def format_table(problem, results, cfg) -> str:
    init_rmse = float(
        np.sqrt(np.mean((problem["omega0"] - problem["omega_true"]) ** 2))
        / problem["omega0"]
    )
    lines = [
        f"regime '{problem['label']}' (‖TA‖₂ = {problem['norm']:.3g}, "
        f"{problem['epochs']} epochs, "
        f"ρ(TA) = {problem['radius']:.3g}); parameter RMSE of ω/ω₀, "
        f"initial guess ω ≡ ω₀: {init_rmse:.2e}",
        "",
        "| method | test loss (own solver) | test loss (exact solve) | parameter RMSE"
        " | solver error at true ω | s/epoch | matvecs/epoch | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["failed"] and not np.isfinite(r["test_own"]):
            lines.append(f"| {r['name']} | failed: {r['failed']} | | | | | | |")
            continue
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f} MB"
        lines.append(
            f"| {r['name']} | {r['test_own']:.2e} | {r['test_exact']:.2e} | "
            f"{r['rmse']:.2e} | {r['solver_error']:.1e} | {r['sec_per_epoch']:.3f} | "
            f"{'–' if r['matvecs'] is None else format(r['matvecs'], ',')} | {peak} |"
        )
    return "\n".join(lines)


def plot(problem, results, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = problem["label"]
    omega0 = problem["omega0"]
    panels = [("true ω", problem["omega_true"])] + [
        (r["name"], r["omega"]) for r in results if r["omega"] is not None
    ]
    vmin = min(float(np.min(p[1])) for p in panels[:1]) / omega0
    vmax = max(float(np.max(p[1])) for p in panels[:1]) / omega0
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5))
    for ax, (title, field) in zip(axes, panels, strict=True):
        im = ax.imshow(
            field.T / omega0,
            origin="lower",
            vmin=vmin,
            vmax=vmax,
            cmap="viridis",
            extent=(0, 1, 0, 1),
        )
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="ω / ω₀")
    fig.suptitle(
        f"wave speed, regime '{label}' (‖TA‖₂ ≈ {problem['norm']:.0f})", fontsize=9
    )
    path_omega = os.path.join(outdir, f"omega_{label}.png")
    fig.savefig(path_omega, dpi=80)
    plt.close(fig)
    return path_omega


def plot_losses(all_results, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(all_results), figsize=(5 * len(all_results), 3.3), squeeze=False
    )
    for ax, (problem, results) in zip(axes[0], all_results, strict=True):
        for r in results:
            ax.semilogy(
                np.arange(1, len(r["losses"]) + 1), r["losses"], label=r["name"]
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss (relative MSE, own solver)")
        ax.set_title(
            f"regime '{problem['label']}' (‖TA‖₂ ≈ {problem['norm']:.0f})", fontsize=9
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(outdir, "loss_curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_timings(cfg, all_results):
    """`<out>/timings.json`: per regime and method, seconds per epoch (mean and
    median over the timed epochs, compilation excluded), compile seconds, matvecs per
    epoch and any failure; the GPU run (`benchmarks/gpu.py`) reads it."""
    timings = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "grid": cfg.grid,
        "num_ics": cfg.num_ics,
        "regimes": {
            problem["label"]: {
                "epochs": problem["epochs"],
                "norm": problem["norm"],
                "methods": {
                    r["name"]: {
                        key: r[key]
                        for key in (
                            "sec_per_epoch",
                            "median_sec_per_epoch",
                            "compile",
                            "matvecs",
                            "rmse",
                            "test_own",
                            "failed",
                        )
                    }
                    for r in results
                },
            }
            for problem, results in all_results
        },
    }
    path = os.path.join(cfg.out, "timings.json")
    with open(path, "w") as f:
        json.dump(timings, f, indent=1)
    return path


# ---------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, script="wave_inverse", methods=METHODS, grid=32)
    p.add_argument("--num-ics", type=int, default=16, help="initial conditions")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument(
        "--hard-epochs",
        type=int,
        default=30,
        help="epochs in the hard regime (0: same as --epochs)",
    )
    p.add_argument("--batch-size", type=int, default=0, help="0: full batch")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--width", type=int, default=32, help="MLP width")
    p.add_argument("--depth", type=int, default=2, help="MLP hidden layers")
    p.add_argument("--horizon", type=float, default=1.0, help="final time T")
    p.add_argument(
        "--norm",
        type=float,
        default=5.0,
        help="‖TA‖₂ of the mild regime (the paper's ≈ 5)",
    )
    p.add_argument(
        "--hard-norm",
        type=float,
        default=800.0,
        help="‖TA‖₂ of the hard regime",
    )
    p.add_argument(
        "--regimes",
        type=comma_list(),
        default=["mild", "hard"],
        help="which regimes to run: mild, hard",
    )
    p.add_argument(
        "--contrast",
        type=float,
        default=0.3,
        help="ω_true = ω₀ exp(contrast · g), g a smooth field in [-1, 1]",
    )
    p.add_argument("--ic-length-scale", type=float, default=0.1)
    p.add_argument("--ic-modes", type=int, default=16)
    p.add_argument(
        "--rtol", type=float, default=1e-6, help="kx-adaptive tolerance (float64)"
    )
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="precision of training (data and references stay float64); float32 "
        "runs krylovexp at its default tolerance",
    )
    p.add_argument("--ref-rtol", type=float, default=1e-10)
    p.add_argument(
        "--hard-methods",
        type=comma_list(),
        default=[],
        help="methods of the hard regime (default: those of --methods)",
    )
    p.add_argument(
        "--cross-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the reference against Diffrax Dopri8",
    )
    p.add_argument(
        "--count-matvecs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the matvecs of one gradient step (one more compilation)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    methods = resolve_methods(cfg.methods, METHODS)
    hard_methods = resolve_methods(cfg.hard_methods, METHODS) or methods
    os.makedirs(cfg.out, exist_ok=True)
    print(
        f"wave_inverse: {cfg.dtype} training, {jax.device_count()} "
        f"{jax.default_backend()} device(s); output in {cfg.out}/"
    )
    norms = {"mild": cfg.norm, "hard": cfg.hard_norm}
    regimes = []
    for label in cfg.regimes:
        if label not in norms or norms[label] <= 0:
            raise SystemExit(f"bad regime {label!r} (need mild/hard with a norm > 0)")
        regimes.append((label, norms[label]))
    all_results = []
    tables = []
    failures = []
    for label, norm in regimes:
        problem = make_problem(cfg, norm, label)
        results = []
        for name in hard_methods if label == "hard" else methods:
            r = train(name, problem, cfg)
            results.append(r)
            if r["failed"]:
                failures.append(f"{label}/{name}: {r['failed']}")
        all_results.append((problem, results))
        table = format_table(problem, results, cfg)
        tables.append(table)
        print("\n" + table + "\n")
        print("wrote", plot(problem, results, cfg.out))
    print("wrote", plot_losses(all_results, cfg.out))
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n")
    write_timings(cfg, all_results)
    summary = {
        label: {r["name"]: r for r in results}
        for (problem, results), (label, _) in zip(all_results, regimes, strict=True)
    }
    summary["problems"] = {p["label"]: p for p, _ in all_results}
    summary["failures"] = failures
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
    return summary


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out["failures"] else 0)
