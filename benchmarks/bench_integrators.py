"""Work–precision benchmark: krylovexp's exponential integrators against Diffrax.

Problems (periodic finite differences, float64, matrix-free):

- `allen-cahn`: 2-D Allen–Cahn `u_t = ε Δu + u - u³` on [0, 1]², 128×128 grid
  (n = 16,384), ε = 0.01 (‖εΔ‖ ≈ 1.3e3), T = 1. Learned parameter: ε.
- `ks`: 1-D Kuramoto–Sivashinsky `u_t = -u_xx - ν u_xxxx - u u_x` on [0, 32π), 512
  points, ν = 1 (‖L‖ ≈ 1.1e4), T = 2. Learned parameter: ν.

Every solver gets the same split `y' = L y + N(t, y)`: krylovexp solvers take
`MultiTerm(LinearTerm(L), ODETerm(N))`, Diffrax's explicit solvers (Tsit5, Dopri5) and
Kvaerno5 take `ODETerm(L y + N)`, KenCarp4 takes `MultiTerm(ODETerm(N), LinearTerm(L))`
with `L` implicit. The implicit solvers use Diffrax's default chord iteration with a
dense LU, so they run on KS only (see `MAX_DENSE`).

For each solver and each point of a tolerance (or step-size) sweep the script reports
the relative 2-norm error of `u(T)` against a Dopri8 reference at rtol = atol = 1e-11,
the forward wall time, the wall time of the gradient of `sum(u(T)²)` with respect to the
physical parameter (RecursiveCheckpointAdjoint with the same `max_steps`, or
`--grad-max-steps`: Diffrax keeps O(sqrt(max_steps)) checkpoints, and at 128² writing
the 200 of `max_steps=20000` costs about 0.26 s per gradient whatever the solver,
while fewer checkpoints make long solves recompute more), the number of steps, the RHS
evaluations (Diffrax: stages × steps) and Krylov matvecs (krylovexp: counted by the
solver). Timings: compiled once, then the median of `--repeats` runs, each ended by
`block_until_ready`. `--methods` takes solver names with or without the `kx.` prefix
(`Exprb32` or `kx.Exprb32`); `--grid` changes the problems' grid size.

`kx.ETDRK4.F` solves the same ODE in the variables `F u` (real FFT, orthonormal): both
problems' `L` are periodic constant-coefficient stencils, circulant matrices that the
FFT diagonalises exactly, so there `L` is a `lineax.DiagonalLinearOperator` of its
eigenvalues (the FFT of `L e_0`) and krylovexp's phi-functions are exact and
elementwise; `N` is evaluated in physical space. Its rows are summarised apart from
the Krylov ones: the path applies only to operators the FFT diagonalises.

    python benchmarks/bench_integrators.py --out benchmarks/out
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
import warnings

import jax


jax.config.update("jax_enable_x64", True)
# The repository root, for the helpers in `support/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.cli import add_common_arguments, comma_list, resolve_methods  # noqa: E402
from support.measure import memory_environment, timed  # noqa: E402


# Diffrax warns on every complex state; the Fourier-space rows' state is complex on
# purpose.
warnings.filterwarnings("ignore", message="Complex dtype support in Diffrax")

# ---------------------------------------------------------------------------------
# Problems.


class Problem(eqx.Module):
    name: str = eqx.field(static=True)
    n: int = eqx.field(static=True)
    t1: float = eqx.field(static=True)
    param: float = eqx.field(static=True)
    kind: str = eqx.field(static=True)
    dx: float = eqx.field(static=True)

    def l_apply(self, u, p):
        if self.kind == "allen-cahn":
            v = u.reshape(self.n, self.n)
            lap = (
                jnp.roll(v, 1, 0)
                + jnp.roll(v, -1, 0)
                + jnp.roll(v, 1, 1)
                + jnp.roll(v, -1, 1)
                - 4 * v
            ) / self.dx**2
            return p * lap.reshape(-1)
        d2 = (jnp.roll(u, 1) + jnp.roll(u, -1) - 2 * u) / self.dx**2
        d4 = (
            jnp.roll(u, 2)
            - 4 * jnp.roll(u, 1)
            + 6 * u
            - 4 * jnp.roll(u, -1)
            + jnp.roll(u, -2)
        ) / self.dx**4
        return -d2 - p * d4

    def nonlinear(self, t, u, p):
        if self.kind == "allen-cahn":
            return u - u**3
        ux = (jnp.roll(u, -1) - jnp.roll(u, 1)) / (2 * self.dx)
        return -u * ux

    @property
    def shape(self):
        return (self.n, self.n) if self.kind == "allen-cahn" else (self.n,)

    def to_fourier(self, u):
        return jnp.fft.rfftn(u.reshape(self.shape), norm="ortho")

    def from_fourier(self, u_hat):
        return jnp.fft.irfftn(u_hat, s=self.shape, norm="ortho").reshape(-1)

    def symbol(self, p):
        """The eigenvalues of `L` on the real-FFT modes. `L` is a periodic stencil, a
        circulant matrix, so `F L F⁻¹` is diagonal and its diagonal is the transform
        of the impulse response `L e_0`: the same operator, not a spectral one."""
        impulse = jnp.zeros(self.n ** len(self.shape)).at[0].set(1.0)
        return jnp.fft.rfftn(self.l_apply(impulse, p).reshape(self.shape))

    def operator(self, p):
        size = self.n * self.n if self.kind == "allen-cahn" else self.n
        struct = jax.ShapeDtypeStruct((size,), jnp.float64)
        return lx.FunctionLinearOperator(
            lambda u: self.l_apply(u, p), struct, lx.symmetric_tag
        )

    def y0(self):
        if self.kind == "allen-cahn":
            s = np.arange(self.n) / self.n
            xx, yy = np.meshgrid(s, s, indexing="ij")
            u = 0.5 * np.sin(2 * np.pi * xx) * np.cos(4 * np.pi * yy) + 0.3 * np.cos(
                6 * np.pi * (xx + yy)
            )
            return jnp.asarray(u.reshape(-1))
        s = 32 * np.pi * np.arange(self.n) / self.n
        return jnp.asarray(np.cos(s / 16) * (1 + np.sin(s / 16)))

    def norm_l(self):
        if self.kind == "allen-cahn":
            return 8 * self.param / self.dx**2
        return 4 / self.dx**2 + 16 * self.param / self.dx**4


PROBLEMS = ("allen-cahn", "ks")


def make_problem(name, grid=None):
    """The problem `name` on its default grid (128² and 512 points) or on `grid`."""
    if name == "allen-cahn":
        n = grid or 128
        return Problem(name, n, 1.0, 0.01, "allen-cahn", 1.0 / n)
    if name == "ks":
        n = grid or 512
        return Problem(name, n, 2.0, 1.0, "ks", 32 * np.pi / n)
    raise SystemExit(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")


# ---------------------------------------------------------------------------------
# Solvers.

# Lanczos applies: L and the Jacobians J = L + ∂N/∂u of Allen–Cahn are symmetric (for
# KS's J the advection part is not, but the phi-function Krylov spaces use incomplete
# orthogonalisation of the augmented operator, which does not need symmetry to stay
# accurate; the a-posteriori estimate still controls the error). Default Krylov
# dimension bounds.
KRYLOV = kx.KrylovExpm(method="lanczos", rtol=1e-9, max_substeps=2000)

# Diffrax's implicit solvers factorise a dense Jacobian (Newton/chord with LU). That is
# fine for KS (n = 512) but not for Allen–Cahn (16,384² entries): there a matrix-free
# linear solver would be needed, and `VeryChord(linear_solver=lineax.GMRES(...))` fails
# at trace time in Diffrax 0.7.2 (a Jaxpr ends up in the solver state). Implicit solvers
# are therefore run only up to `MAX_DENSE` unknowns.
MAX_DENSE = 4096

SOLVERS = {
    # name: (solver, terms kind, adaptive, RHS evaluations per step or None)
    "kx.ETDRK4": (kx.ETDRK4(krylov=KRYLOV), "kx", False, 4),
    "kx.Exprb32": (kx.Exprb32(krylov=KRYLOV), "kx", True, 2),
    "kx.Exprb43": (kx.Exprb43(krylov=KRYLOV), "kx", True, 3),
    # The same ODE in the variables `F u` (real FFT): L is diagonal there, and the
    # phi-functions are exact and elementwise (no Krylov sweep). Only for operators
    # that the FFT diagonalises (constant-coefficient periodic stencils).
    "kx.ETDRK4.F": (kx.ETDRK4(krylov=KRYLOV), "fourier", False, 4),
    "Tsit5": (diffrax.Tsit5(), "full", True, 6),
    "Dopri5": (diffrax.Dopri5(), "full", True, 6),
    "Kvaerno5": (diffrax.Kvaerno5(), "full", True, None),
    "KenCarp4": (diffrax.KenCarp4(), "imex", True, None),
}
IMPLICIT = ("Kvaerno5", "KenCarp4")

RTOLS = (1e-4, 1e-5)


def terms_for(problem, kind):
    def nonlinear(t, y, p):
        return problem.nonlinear(t, y, p)

    if kind == "fourier":

        def diagonal(p):
            symbol = problem.symbol(p)
            return lx.DiagonalLinearOperator(symbol.astype(jnp.complex128))

        def nonlinear_hat(t, y_hat, p):
            u = problem.from_fourier(y_hat)
            return problem.to_fourier(problem.nonlinear(t, u, p))

        return diffrax.MultiTerm(
            kx.LinearTerm(diagonal), diffrax.ODETerm(nonlinear_hat)
        )

    if kind == "kx":
        return diffrax.MultiTerm(
            kx.LinearTerm(problem.operator), diffrax.ODETerm(nonlinear)
        )
    if kind == "imex":
        # Diffrax's IMEX order: explicit N first, implicit L y second.
        return diffrax.MultiTerm(
            diffrax.ODETerm(nonlinear), kx.LinearTerm(problem.operator)
        )
    return diffrax.ODETerm(
        lambda t, y, p: problem.l_apply(y, p) + problem.nonlinear(t, y, p)
    )


@eqx.filter_jit
def solve(problem, name, control, param, max_steps):
    """`control`: the step size (fixed-step solvers) or rtol (adaptive; atol = rtol·1e-2
    relative to the O(1) solution)."""
    solver, kind, adaptive, _ = SOLVERS[name]
    if adaptive:
        controller = diffrax.PIDController(rtol=control, atol=1e-2 * control)
        dt0 = jnp.asarray(1e-4 * problem.t1)
    else:
        controller = diffrax.ConstantStepSize()
        dt0 = control
    fourier = kind == "fourier"
    y0 = problem.y0()
    sol = diffrax.diffeqsolve(
        terms_for(problem, kind),
        solver,
        0.0,
        problem.t1,
        dt0,
        problem.to_fourier(y0) if fourier else y0,
        args=param,
        stepsize_controller=controller,
        saveat=diffrax.SaveAt(t1=True, solver_state=kind == "kx"),
        max_steps=max_steps,
        throw=False,
    )
    if fourier:
        ys = jax.vmap(problem.from_fourier)(sol.ys)
        sol = eqx.tree_at(lambda s: s.ys, sol, ys)
    return sol


@eqx.filter_jit
def gradient(problem, name, control, param, max_steps):
    def loss(p):
        return jnp.sum(solve(problem, name, control, p, max_steps).ys[-1] ** 2)

    return jax.value_and_grad(loss)(param)


def reference(problem):
    sol = diffrax.diffeqsolve(
        terms_for(problem, "full"),
        diffrax.Dopri8(),
        0.0,
        problem.t1,
        1e-5,
        problem.y0(),
        args=jnp.asarray(problem.param),
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=200_000,
    )
    return sol.ys[-1], int(sol.stats["num_steps"])


def sweep_points(problem, name, rtols, steps):
    _, _, adaptive, _ = SOLVERS[name]
    if adaptive:
        return [jnp.asarray(r) for r in rtols]
    # Fixed steps for ETDRK4: `steps` steps over [0, T].
    return [jnp.asarray(problem.t1 / m) for m in steps]


def run(
    problem,
    names,
    repeats,
    grad_repeats,
    rtols=RTOLS,
    steps=(4, 8, 16),
    max_steps=20_000,
    grad_max_steps=None,
):
    ref, ref_steps = reference(problem)
    print(
        f"\n## {problem.name}: n = {problem.y0().size}, T = {problem.t1}, "
        f"‖L‖ ≈ {problem.norm_l():.3g}; reference Dopri8 rtol 1e-11 "
        f"({ref_steps} steps)",
        flush=True,
    )
    rows = []
    param = jnp.asarray(problem.param)
    for name in names:
        solver, kind, adaptive, stages = SOLVERS[name]
        if name in IMPLICIT and problem.y0().size > MAX_DENSE:
            size = problem.y0().size
            print(f"| {name} | – | not run: dense {size}² Jacobian (MAX_DENSE) |||||")
            continue
        for control in sweep_points(problem, name, rtols, steps):
            sol, t_fwd = timed(
                lambda c=control, s=name, m=max_steps: solve(problem, s, c, param, m),
                repeats=repeats,
            )
            if sol.result != diffrax.RESULTS.successful:
                print(f"{name:12s} {float(control):.0e}: failed ({sol.result})")
                continue
            err = float(jnp.linalg.norm(sol.ys[-1] - ref) / jnp.linalg.norm(ref))
            num_steps = int(sol.stats["num_steps"])
            accepted = int(sol.stats["num_accepted_steps"])
            if kind == "kx":
                matvecs = int(sol.solver_state)  # accepted steps
                # Scale to all steps (rejected steps cost about the same).
                matvecs = int(round(matvecs * num_steps / max(accepted, 1)))
                rhs = stages * num_steps
                work = f"{rhs} N + {matvecs} mv"
            elif kind == "fourier":
                work = f"{stages * num_steps} N, 0 mv"
            elif stages is not None:
                work = f"{stages * num_steps} RHS"
            else:
                work = f"{num_steps} steps (chord + dense LU)"
            # Diffrax keeps O(sqrt(max_steps)) checkpoints for the backward pass:
            # fewer mean more recomputation, more mean more memory written per call
            # (see the module docstring).
            bound = grad_max_steps or max_steps
            _, t_grad = timed(
                lambda c=control, s=name, m=bound: gradient(problem, s, c, param, m),
                repeats=grad_repeats,
            )
            label = (
                f"dt={float(control):.3g}"
                if not adaptive
                else (f"rtol={float(control):.0e}")
            )
            max_dim = getattr(getattr(solver, "krylov", None), "max_krylov_dim", None)
            if max_dim is not None:
                label += f", m<={max_dim}"
            row = dict(
                problem=problem.name,
                solver=name,
                setting=label,
                error=err,
                forward=t_fwd,
                grad=t_grad,
                steps=num_steps,
                work=work,
            )
            rows.append(row)
            print(
                f"| {name} | {label} | {err:.2e} | {1e3 * t_fwd:.0f} | "
                f"{1e3 * t_grad:.0f} | {num_steps} | {work} |",
                flush=True,
            )
    return rows


def summary(rows, target=1e-4):
    lines = []
    for problem in sorted({r["problem"] for r in rows}):
        best = {}
        for r in rows:
            if r["problem"] != problem or r["error"] > target:
                continue
            cur = best.get(r["solver"])
            if cur is None or r["forward"] < cur["forward"]:
                best[r["solver"]] = r
        if not best:
            continue

        def pick(names, quantity, best=best):
            cands = [best[n] for n in names if n in best]
            return min(cands, key=lambda row: row[quantity]) if cands else None

        krylov_path = ["kx.ETDRK4", "kx.Exprb32", "kx.Exprb43"]
        fourier_path = ["kx.ETDRK4.F"]
        for ours, path, key in [
            (o, p, k)
            for o, p in ((krylov_path, "Krylov"), (fourier_path, "diagonal (FFT)"))
            for k in ("forward", "grad")
        ]:
            o = pick(ours, key)
            e = pick(["Tsit5", "Dopri5"], key)
            i = pick(["Kvaerno5", "KenCarp4"], key)
            if o is None:
                if any(r["solver"] in ours for r in rows if r["problem"] == problem):
                    lines.append(
                        f"{problem} {key}: no krylovexp {path} run reached {target:g}"
                    )
                continue
            parts = [
                f"{problem} {key} at error ≤ {target:g}: best krylovexp ({path} path) "
                f"{o['solver']} {1e3 * o[key]:.0f} ms"
            ]
            if e:
                parts.append(
                    f"best explicit {e['solver']} {1e3 * e[key]:.0f} ms "
                    f"(speed-up {e[key] / o[key]:.1f}×, target 3×)"
                )
            if i:
                parts.append(
                    f"best implicit/IMEX {i['solver']} {1e3 * i[key]:.0f} ms "
                    f"(speed-up {i[key] / o[key]:.1f}×, target 2×)"
                )
            lines.append("; ".join(parts))
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({r["problem"] for r in rows})
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.5))
    axes = np.atleast_1d(axes)
    for ax, problem in zip(axes, problems, strict=True):
        for name in SOLVERS:
            rs = [r for r in rows if r["problem"] == problem and r["solver"] == name]
            if not rs:
                continue
            style = "o-" if name.startswith("kx.") else "s--"
            ax.loglog(
                [r["forward"] for r in rs], [r["error"] for r in rs], style, label=name
            )
        ax.axhline(1e-4, color="grey", lw=0.5)
        ax.set_xlabel("forward wall time [s]")
        ax.set_ylabel("relative error of u(T)")
        ax.set_title(problem)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _merge(rows_path, new_rows):
    old = []
    if os.path.exists(rows_path):
        with open(rows_path) as f:
            old = json.load(f)
    keys = {(r["problem"], r["solver"], r["setting"]) for r in new_rows}
    rows = [r for r in old if (r["problem"], r["solver"], r["setting"]) not in keys]
    rows += new_rows
    order = {name: i for i, name in enumerate(SOLVERS)}
    rows.sort(key=lambda r: (r["problem"], order.get(r["solver"], 99), r["setting"]))
    with open(rows_path, "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(
        parser,
        script="bench_integrators",
        methods=list(SOLVERS),
        grid=None,
        grid_help="grid points per side (default: 128 for allen-cahn, 512 for ks)",
    )
    parser.add_argument("--problems", type=comma_list(), default=list(PROBLEMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grad-repeats", type=int, default=1)
    parser.add_argument("--rtols", type=comma_list(float), default=list(RTOLS))
    parser.add_argument("--steps", type=comma_list(int), default=[4, 8])
    parser.add_argument(
        "--max-steps",
        type=int,
        default=20_000,
        help="Diffrax max_steps of every solve (fine grids need more for Tsit5)",
    )
    parser.add_argument(
        "--krylov-rtol",
        type=float,
        default=KRYLOV.rtol,
        help="relative tolerance of every Krylov sweep of the krylovexp solvers",
    )
    parser.add_argument(
        "--krylov-max-dim",
        type=int,
        default=None,
        help="max_krylov_dim of the krylovexp solvers' sweeps (default: the "
        "library's); their rows' setting then ends in ', m<=...'",
    )
    parser.add_argument(
        "--grad-max-steps",
        type=int,
        default=None,
        help="Diffrax max_steps of the gradient solves (default: --max-steps; "
        "Diffrax's checkpoint memory grows with it)",
    )
    args = parser.parse_args(argv)
    if args.krylov_rtol != KRYLOV.rtol or args.krylov_max_dim is not None:
        krylov = dataclasses.replace(
            KRYLOV, rtol=args.krylov_rtol, max_krylov_dim=args.krylov_max_dim
        )
        for name, (solver, *rest) in list(SOLVERS.items()):
            if name.startswith("kx."):
                SOLVERS[name] = (type(solver)(krylov=krylov), *rest)
    methods = resolve_methods(args.methods, list(SOLVERS))
    os.makedirs(args.out, exist_ok=True)
    print(
        f"jax {jax.__version__}, diffrax {diffrax.__version__}, devices {jax.devices()}"
        f"; {memory_environment()}"
    )
    print(
        "| solver | setting | rel. error | forward [ms] | gradient [ms] | steps | "
        "work |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    start = time.perf_counter()
    for name in args.problems:
        rows += run(
            make_problem(name, args.grid),
            methods,
            args.repeats,
            args.grad_repeats,
            args.rtols,
            args.steps,
            args.max_steps,
            args.grad_max_steps,
        )
    # Rows accumulate across runs (a partial run replaces only its own rows).
    rows = _merge(os.path.join(args.out, "integrators_rows.json"), rows)
    print("\nAll rows (this and earlier runs):")
    print(
        "| problem | solver | setting | rel. error | forward [ms] | gradient [ms] | "
        "steps | work |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['problem']} | {r['solver']} | {r['setting']} | {r['error']:.2e} | "
            f"{1e3 * r['forward']:.0f} | {1e3 * r['grad']:.0f} | {r['steps']} | "
            f"{r['work']} |"
        )
    print()
    for line in summary(rows):
        print(line)
    path = os.path.join(args.out, "integrators_work_precision.png")
    plot(rows, path)
    print(f"\nwork–precision plot: {path}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
