"""krylovexp on exponax's own ground: periodic semilinear PDEs in Fourier space.

For each problem an exponax 0.2.0 stepper is built (fixed `dt`, ETDRK order 4 or 2,
Cox–Matthews ETDRK4 with Kassam–Trefethen contour coefficients). From the SAME
stepper the script takes the diagonal Fourier symbol `L` (`_build_linear_operator`)
and the dealiased pseudo-spectral nonlinearity `N` (`_build_nonlinear_fun`), the two
hooks every exponax stepper implements, and integrates `û' = L û + N(û)` with
`krylovexp.ETDRK4` (Krogstad) and `krylovexp.ETDRK2` through `diffrax.diffeqsolve`:
`MultiTerm(LinearTerm(lineax.DiagonalLinearOperator(L)), ODETerm(N))`, fixed steps
(`diffrax.StepTo` on the grid `k dt`), complex state `û` (the rFFT of the state), so
the φ-functions come from krylovexp's exact diagonal path (no Krylov sweep).

Problems (float64, same grid, `dt` and initial condition for both libraries):

- `ks1d`: `exponax.stepper.KuramotoSivashinsky`, 1-D, extent 60, 256 points, dt 0.1.
- `ks2d`: the same equation in 2-D, extent 30, 64×64 points, dt 0.05.
- `sh2d`: `exponax.stepper.reaction.SwiftHohenberg`, 2-D, extent 20π, 64×64
  points, dt 0.25 (reactivity 0.7: the linear part has growing modes, `L > 0`).

Initial condition: `exponax.ic.RandomTruncatedFourierSeries(cutoff=5, max_one=True)`
(key 0). Columns:

- error: relative 2-norm error of the state after `--steps` steps against a tight
  reference, exponax's ETDRK4 with `dt / --refine` (the reference is checked against
  krylovexp's ETDRK4 at the same refined step; their difference is printed).
- rollout: wall time per step of a `--steps`-step rollout from a physical initial
  condition to the physical trajectory (exponax: `exponax.rollout`, which transforms
  in and out of Fourier space every step, and a scan of `step_fourier` with one
  transform at each end; krylovexp: `diffeqsolve` with `SaveAt(steps=True)`, one
  transform at each end).
- gradient: wall time per step of `jax.grad` of the rollout loss `mean(u²)` over the
  whole trajectory with respect to the initial condition (exponax: reverse mode
  through `lax.scan`, every step stored; krylovexp: `RecursiveCheckpointAdjoint`
  with one checkpoint per step, the same storage policy; `--checkpoints` changes it).

Timings: compiled first, then the median of `--repeats` runs, each ended by
`block_until_ready`; krylovexp and exponax runs interleaved so that load changes
affect both.

    python benchmarks/bench_exponax.py
"""

import argparse
import pathlib
import statistics
import sys
import time
import warnings

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import exponax as ex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import krylovexp as kx  # noqa: E402
from support.measure import rel_err  # noqa: E402


# Diffrax warns on every complex state; the Fourier-space state is complex on purpose.
warnings.filterwarnings("ignore", message="Complex dtype support in Diffrax")

PROBLEMS = {
    "ks1d": dict(
        make=lambda order, dt: ex.stepper.KuramotoSivashinsky(
            1, 60.0, 256, dt, order=order
        ),
        dims=1,
        points=256,
        dt=0.1,
    ),
    "ks2d": dict(
        make=lambda order, dt: ex.stepper.KuramotoSivashinsky(
            2, 30.0, 64, dt, order=order
        ),
        dims=2,
        points=64,
        dt=0.05,
    ),
    "sh2d": dict(
        make=lambda order, dt: ex.stepper.reaction.SwiftHohenberg(
            2, 20 * np.pi, 64, dt, order=order
        ),
        dims=2,
        points=64,
        dt=0.25,
    ),
}


class Setup:
    """An exponax stepper and krylovexp's view of the same equation."""

    def __init__(self, name, order, dt=None):
        spec = PROBLEMS[name]
        self.name = name
        self.dims = spec["dims"]
        self.points = spec["points"]
        self.dt = spec["dt"] if dt is None else dt
        self.stepper = spec["make"](order, self.dt)
        self.axes = tuple(range(-self.dims, 0))
        derivative = ex.spectral.build_derivative_operator(
            self.dims, self.stepper.domain_extent, self.points
        )
        self.symbol = self.stepper._build_linear_operator(derivative)
        self.nonlinear = self.stepper._build_nonlinear_fun(derivative)
        generator = ex.ic.RandomTruncatedFourierSeries(
            self.dims, cutoff=5, max_one=True
        )
        u0 = generator(self.points, key=jax.random.PRNGKey(0))
        self.u0 = jnp.broadcast_to(
            u0, (self.stepper.num_channels,) + u0.shape[1:]
        ).astype(jnp.float64)

    def rfft(self, u):
        return jnp.fft.rfftn(u, axes=self.axes)

    def irfft(self, u_hat):
        shape = (self.points,) * self.dims
        return jnp.fft.irfftn(u_hat, s=shape, axes=self.axes)

    def terms(self):
        u_hat = jax.eval_shape(self.rfft, self.u0)
        symbol = jnp.broadcast_to(self.symbol, u_hat.shape).astype(u_hat.dtype)
        linear = kx.LinearTerm(lx.DiagonalLinearOperator(symbol))
        return diffrax.MultiTerm(
            linear, diffrax.ODETerm(lambda t, y, args: self.nonlinear(y))
        )


def exponax_rollout(setup, steps):
    return ex.rollout(setup.stepper, steps)


def exponax_fourier_rollout(setup, steps):
    def run(u0):
        def body(u_hat, _):
            u_hat = setup.stepper.step_fourier(u_hat)
            return u_hat, u_hat

        _, trajectory = jax.lax.scan(body, setup.rfft(u0), None, length=steps)
        return setup.irfft(trajectory)

    return run


def krylovexp_rollout(setup, steps, solver, checkpoints):
    terms = setup.terms()
    grid = setup.dt * jnp.arange(steps + 1)

    def run(u0):
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            grid[-1],
            None,
            setup.rfft(u0),
            stepsize_controller=diffrax.StepTo(ts=grid),
            saveat=diffrax.SaveAt(steps=True),
            max_steps=steps,
            adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints),
        )
        return setup.irfft(sol.ys)

    return run


def loss_of(rollout):
    def loss(u0):
        return jnp.mean(rollout(u0) ** 2)

    return loss


def compiled_timer(fn, *args):
    """Compiled `fn` and a function returning one wall time of a run."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))

    def once():
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        return time.perf_counter() - start

    return compiled, once


def interleaved_medians(runs, repeats):
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, once in runs.items():
            times[name].append(once())
    return {name: statistics.median(ts) for name, ts in times.items()}


def reference_state(name, steps, refine, base_dt):
    """exponax ETDRK4 at `dt / refine`: the state after `steps` coarse steps."""
    fine = Setup(name, 4, base_dt / refine)

    def run(u0):
        def body(u_hat, _):
            return fine.stepper.step_fourier(u_hat), None

        u_hat, _ = jax.lax.scan(body, fine.rfft(u0), None, length=steps * refine)
        return fine.irfft(u_hat)

    return jax.jit(run)(fine.u0), fine


def krylovexp_state(setup, steps, solver):
    rollout = krylovexp_rollout(setup, steps, solver, checkpoints=None)
    return jax.jit(rollout)(setup.u0)[-1]


def run_problem(name, args):
    rows = []
    base = Setup(name, 4)
    steps = args.steps
    reference, fine = reference_state(name, steps, args.refine, base.dt)
    check = krylovexp_state(fine, steps * args.refine, kx.ETDRK4())
    reference_gap = rel_err(check, reference)
    symbol_norm = float(jnp.max(jnp.abs(base.symbol)) * base.dt)
    for order, ours in ((4, kx.ETDRK4()), (2, kx.ETDRK2())):
        setup = Setup(name, order)
        u0 = setup.u0
        ex_phys = exponax_rollout(setup, steps)
        ex_four = exponax_fourier_rollout(setup, steps)
        mine = krylovexp_rollout(setup, steps, ours, args.checkpoints or steps)
        error_ex = rel_err(ex_phys(u0)[-1], reference)
        error_kx = rel_err(mine(u0)[-1], reference)
        forward = {
            "exponax": compiled_timer(ex_phys, u0)[1],
            "exponax_fourier": compiled_timer(ex_four, u0)[1],
            "krylovexp": compiled_timer(mine, u0)[1],
        }
        grad = {
            "exponax": compiled_timer(jax.grad(loss_of(ex_phys)), u0)[1],
            "exponax_fourier": compiled_timer(jax.grad(loss_of(ex_four)), u0)[1],
            "krylovexp": compiled_timer(jax.grad(loss_of(mine)), u0)[1],
        }
        forward = interleaved_medians(forward, args.repeats)
        grad = interleaved_medians(grad, args.grad_repeats)
        rows.append(
            dict(
                problem=name,
                order=order,
                error_ex=error_ex,
                error_kx=error_kx,
                forward=forward,
                grad=grad,
                steps=steps,
                reference_gap=reference_gap,
                symbol_norm=symbol_norm,
            )
        )
        print_rows(rows[-1:], header=len(rows) == 1)
    return rows


def print_rows(rows, header):
    if header:
        print(
            "| problem | order | error exponax | error krylovexp | ratio | "
            "rollout exponax [µs/step] (Fourier) | rollout krylovexp | ratio | "
            "gradient exponax [µs/step] (Fourier) | gradient krylovexp | ratio |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = 1e6 / r["steps"]
        fwd, grd = r["forward"], r["grad"]
        best_fwd = min(fwd["exponax"], fwd["exponax_fourier"])
        best_grd = min(grd["exponax"], grd["exponax_fourier"])
        print(
            f"| {r['problem']} | {r['order']} | {r['error_ex']:.2e} | "
            f"{r['error_kx']:.2e} | {r['error_kx'] / r['error_ex']:.2f} | "
            f"{fwd['exponax'] * per:.0f} ({fwd['exponax_fourier'] * per:.0f}) | "
            f"{fwd['krylovexp'] * per:.0f} | {fwd['krylovexp'] / best_fwd:.2f} | "
            f"{grd['exponax'] * per:.0f} ({grd['exponax_fourier'] * per:.0f}) | "
            f"{grd['krylovexp'] * per:.0f} | {grd['krylovexp'] / best_grd:.2f} |",
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", default="ks1d,ks2d,sh2d")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--refine", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--grad-repeats", type=int, default=5)
    parser.add_argument(
        "--checkpoints",
        type=int,
        default=0,
        help="krylovexp gradient checkpoints (0: one per step)",
    )
    args = parser.parse_args(argv)
    rows = []
    for name in args.problems.split(","):
        rows += run_problem(name, args)
    print()
    for r in rows[::2]:
        print(
            f"{r['problem']}: |dt L|max = {r['symbol_norm']:.3g}; reference "
            f"(exponax ETDRK4, dt/{args.refine}) vs krylovexp ETDRK4 at the same "
            f"step: {r['reference_gap']:.1e}"
        )
    return rows


if __name__ == "__main__":
    main()
