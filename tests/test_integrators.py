"""Exponential integrators as Diffrax solvers.

Every number is checked against an independent reference: the exact solution of a
manufactured semi-discrete problem, a dense `jax.scipy.linalg.expm`, or central finite
differences. To keep the file fast, one compiled solve per solver configuration is
shared between tests (step sizes, times, parameters and initial values are traced).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
import numpy as np
import pytest

import krylovexp as kx
from support.measure import rel_err
from support.operators import laplacian_1d


# ---------------------------------------------------------------------------------
# A stiff semilinear problem with a known solution.
#
# y' = L y + N(t, y, args) on a periodic grid of n points on [0, 2π), with
# L = a D2 + b D1 (central differences; a = 1 gives ‖L‖ ≈ 4/dx² ≈ 415), and
# N = r (y - y³) + g(t), where g is chosen so that u*(t) below solves the
# semi-discrete system exactly.

n = 64
x = 2 * np.pi * np.arange(n) / n
dx = x[1] - x[0]


def d2(u):
    return (jnp.roll(u, 1) + jnp.roll(u, -1) - 2 * u) / dx**2


def d1(u):
    return (jnp.roll(u, -1) - jnp.roll(u, 1)) / (2 * dx)


def exact(t):
    return (
        0.5 * jnp.sin(x - t) * (1 + 0.3 * jnp.sin(2 * t))
        + 0.2 * jnp.cos(2 * x + t)
        + 0.1
    )


def exact_dot(t):
    return jax.jvp(exact, (t,), (jnp.ones_like(t),))[1]


def l_apply(u, args):
    a, b, _ = args
    return a * d2(u) + b * d1(u)


def linear_operator(args):
    struct = jax.ShapeDtypeStruct((n,), jnp.float64)
    return lx.FunctionLinearOperator(lambda u: l_apply(u, args), struct)


def nonlinear(t, y, args):
    r = args[2]
    star = exact(t)
    forcing = exact_dot(t) - l_apply(star, args) - r * (star - star**3)
    return r * (y - y**3) + forcing


def full(t, y, args):
    return l_apply(y, args) + nonlinear(t, y, args)


def make_terms(kind):
    if kind == "semilinear":
        return diffrax.MultiTerm(
            kx.LinearTerm(linear_operator), diffrax.ODETerm(nonlinear)
        )
    assert kind == "general"
    return diffrax.ODETerm(full)


DIFFUSION = (1.0, 0.0, 1.0)  # stiff: ‖L‖ ≈ 415
ADVECTION = (0.0, 2.0, 1.0)  # skew-symmetric L: well posed in both directions

TIGHT = kx.KrylovExpm(rtol=1e-12)


# Dense output is sampled at these fractions of a step, in four steps spread over the
# interval.
DENSE_THETAS = (0.2, 0.5)


def dense_times(t0, t1, dt):
    """`t0 + (k + θ) dt` for θ in `DENSE_THETAS` and four steps k spread over
    `[t0, t1]` (clipped to it); traced, so one compilation serves every step size."""
    steps = jnp.round((t1 - t0) / dt)
    k = jnp.floor(jnp.arange(4) * steps / 4)
    # Sorted (in steps of dt), so that the times are monotone even where fewer than
    # four steps make k repeat.
    offsets = jnp.sort((k[:, None] + jnp.asarray(DENSE_THETAS)[None]).reshape(-1))
    return jnp.clip(t0 + offsets * dt, jnp.minimum(t0, t1), jnp.maximum(t0, t1))


def fixed_solve(solver, kind, t0, t1, dt, y0, args, max_steps=64):
    """Constant steps; times are passed as arrays so that one compilation per solver
    serves every step size and direction. `ys[:-1]` is the dense output at
    `dense_times(t0, t1, dt)`, `ys[-1]` the value at `t1`."""
    times = jnp.asarray([t0, t1, dt], dtype=jnp.float64)
    return _fixed_solve(solver, kind, times, y0, args, max_steps)


@eqx.filter_jit
def _fixed_solve(solver, kind, times, y0, args, max_steps):
    t0, t1, dt = times
    ts = jnp.concatenate([dense_times(t0, t1, dt), t1[None]])
    return diffrax.diffeqsolve(
        make_terms(kind),
        solver,
        t0,
        t1,
        dt,
        y0,
        args=args,
        max_steps=max_steps,
        throw=False,
        saveat=diffrax.SaveAt(ts=ts, solver_state=True),
    )


def args_of(values):
    return tuple(jnp.asarray(v) for v in values)


# ---------------------------------------------------------------------------------
# Convergence orders, at the step ends and of the dense output.


@pytest.mark.parametrize(
    "solver, nominal",
    [
        pytest.param(kx.ExponentialEuler(krylov=TIGHT), 1, marks=pytest.mark.slow),
        pytest.param(kx.ETDRK2(krylov=TIGHT), 2, marks=pytest.mark.slow),
        (kx.ETDRK4(krylov=TIGHT), 4),
        pytest.param(kx.HochOst4(krylov=TIGHT), 4, marks=pytest.mark.slow),
        pytest.param(kx.Exprb32(krylov=TIGHT), 3, marks=pytest.mark.slow),
        (kx.Exprb43(krylov=TIGHT), 4),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, int) else str(v),
)
def test_convergence_order(solver, nominal):
    t0, t1 = 0.0, 1.0
    args = args_of(DIFFUSION)
    steps = np.array([8, 16, 32])
    errors, dense_errors = [], []
    for m in steps:
        dt = (t1 - t0) / m
        sol = fixed_solve(solver, "semilinear", t0, t1, dt, exact(t0), args)
        assert sol.result == diffrax.RESULTS.successful
        assert int(sol.stats["num_steps"]) == m
        errors.append(rel_err(sol.ys[-1], exact(t1)))
        ts = dense_times(t0, t1, dt)
        dense_errors.append(
            max(rel_err(y, exact(t)) for t, y in zip(ts, sol.ys[:-1], strict=True))
        )
    # The largest step has h‖L‖ ≈ 52: the problem is stiff at every step size used.
    slope = np.polyfit(np.log(1.0 / steps), np.log(errors), 1)[0]
    assert abs(slope - nominal) < 0.3, (slope, errors)
    assert np.all(np.diff(errors) < 0) and errors[-1] < 0.05
    # Dense output between the step ends: same order, and no larger than the global
    # error at the end of the interval.
    dense_slope = np.polyfit(np.log(1.0 / steps), np.log(dense_errors), 1)[0]
    assert abs(dense_slope - nominal) < 0.3, (dense_slope, dense_errors)
    # HochOst4's continuous extension (its last sweep at the interior nodes) has
    # order 4 with a larger constant.
    dense_factor = 4.0 if isinstance(solver, kx.HochOst4) else 1.5
    assert np.all(np.asarray(dense_errors) < dense_factor * np.asarray(errors)), (
        dense_errors
    )
    if isinstance(solver, kx.ETDRK4):
        # Backward in time (skew-symmetric L, well posed backwards): from u*(1) to 0.
        back = fixed_solve(
            solver, "semilinear", 1.0, 0.0, -1.0 / 16, exact(1.0), args_of(ADVECTION)
        )
        assert back.result == diffrax.RESULTS.successful
        assert rel_err(back.ys[-1], exact(0.0)) < 1e-5
        fwd = fixed_solve(
            solver, "semilinear", 0.0, 1.0, 1.0 / 16, exact(0.0), args_of(ADVECTION)
        )
        assert rel_err(fwd.ys[-1], exact(1.0)) < 1e-5


# ---------------------------------------------------------------------------------
# LinearExponential is exact at any step size.


def test_linear_exponential_exact_large_steps():
    key = jax.random.PRNGKey(0)
    m = 40
    skew = jax.random.normal(key, (m, m))
    matrix = jnp.asarray(laplacian_1d(m, 400.0)) + 3.0 * (skew - skew.T)  # ‖A‖ ≈ 1600
    y0 = jnp.cos(jnp.arange(m) / 3.0)
    ts = jnp.asarray([0.25, 0.5, 1.0])
    # The operator counts its own applications, to check the solver's count.
    applications = []

    def operator(args):
        def mv(y):
            jax.debug.callback(lambda: applications.append(1))
            return args * (matrix @ y)

        return lx.FunctionLinearOperator(mv, jax.ShapeDtypeStruct((m,), y0.dtype))

    term = kx.LinearTerm(operator)
    sol = diffrax.diffeqsolve(
        term,
        kx.LinearExponential(rtol=1e-10),
        0.0,
        1.0,
        0.25,  # h‖A‖ ≈ 400
        y0,
        args=jnp.asarray(1.0),
        saveat=diffrax.SaveAt(ts=ts, solver_state=True),
    )
    for t, y in zip(ts, sol.ys, strict=True):
        reference = jsl.expm(t * matrix) @ y0
        assert jnp.linalg.norm(y - reference) <= 1e-9 * jnp.linalg.norm(y0)
    assert int(sol.stats["num_steps"]) == 4
    # The solver state counts operator applications (every step is accepted here).
    assert int(sol.solver_state) == len(applications)


# ---------------------------------------------------------------------------------
# Adaptive stepping meets the tolerance; dense output is correct.


def _lanczos_exprb32(rtol, atol):
    # The diffusion problem's Jacobian `L + r (1 - 3 y²)` is symmetric. The solver's
    # tolerances fill in those the given `krylov` leaves unset.
    solver = kx.Exprb32(rtol=rtol, atol=atol, krylov=kx.KrylovExpm(method="lanczos"))
    assert (solver._krylov().rtol, solver._krylov().atol) == (0.1 * rtol, 0.1 * atol)
    return solver


@pytest.mark.parametrize(
    "make_solver, rtol, max_steps",
    [
        (kx.Exprb32, 1e-6, 200),
        (_lanczos_exprb32, 1e-6, 200),
        (kx.ETDRK2, 1e-4, 400),
    ],
    ids=["Exprb32", "Exprb32-lanczos", "ETDRK2"],
)
def test_adaptive_semilinear_saveat_ts(make_solver, rtol, max_steps):
    """A `PIDController` on the embedded error estimate (ETDRK2's is that of its
    exponential Euler stage) meets the tolerance in the stiff regime."""
    atol = 1e-2 * rtol
    ts = jnp.linspace(0.0, 1.0, 11)
    sol = diffrax.diffeqsolve(
        make_terms("semilinear"),
        make_solver(rtol=rtol, atol=atol),
        0.0,
        1.0,
        0.01,
        exact(0.0),
        args=args_of(DIFFUSION),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(ts=ts),
        max_steps=500,
    )
    errors = [rel_err(y, exact(t)) for t, y in zip(ts, sol.ys, strict=True)]
    # Global error within a small multiple of the local tolerance.
    assert max(errors) < 20 * rtol, errors
    assert max(errors) > 1e-10  # the check is not vacuous: it is a real approximation
    assert int(sol.stats["num_accepted_steps"]) < max_steps


@pytest.mark.slow
def test_adaptive_exprb43_odeterm_dense_backward():
    # A plain ODETerm: the Jacobian enters only through JVPs of `full`. Backward in
    # time on the skew-symmetric problem, with dense output.
    rtol, atol = 1e-7, 1e-9
    sol = diffrax.diffeqsolve(
        make_terms("general"),
        kx.Exprb43(rtol=rtol, atol=atol),
        1.0,
        0.0,
        -0.05,
        exact(1.0),
        args=args_of(ADVECTION),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True, dense=True),
        max_steps=500,
    )
    assert sol.result == diffrax.RESULTS.successful
    assert rel_err(sol.ys[-1], exact(0.0)) < 20 * rtol
    for t in np.linspace(0.97, 0.03, 9):
        assert rel_err(sol.evaluate(t), exact(t)) < 50 * rtol, t
    assert int(sol.stats["num_accepted_steps"]) >= 3


@eqx.filter_jit
def _one_step(solver, h, y0, args):
    """One step of `solver` from t = 0 on the semilinear problem, called directly."""
    terms = make_terms("semilinear")
    t0 = jnp.zeros_like(h)
    state = solver.init(terms, t0, h, y0, args)
    y1, y_error, _, _, _ = solver.step(terms, t0, h, y0, args, state, False)
    return y1, y_error


@pytest.mark.parametrize(
    "solver",
    [
        kx.ETDRK2(krylov=TIGHT),
        kx.Exprb32(krylov=TIGHT),
        pytest.param(kx.Exprb43(krylov=TIGHT), marks=pytest.mark.slow),
    ],
    ids=lambda s: type(s).__name__,
)
def test_error_estimate_order(solver):
    """The step-size controller takes `error_order` as the power of h in the local
    error estimate; measure it. The step's own local error is one order higher."""
    steps = np.array([0.1, 0.05, 0.025])
    estimates, local_errors = [], []
    for h in steps:
        y1, y_error = _one_step(solver, jnp.asarray(h), exact(0.0), args_of(ADVECTION))
        estimates.append(float(jnp.linalg.norm(y_error)))
        local_errors.append(float(jnp.linalg.norm(y1 - exact(h))))
    terms = make_terms("semilinear")
    slope = np.polyfit(np.log(steps), np.log(estimates), 1)[0]
    assert abs(slope - solver.error_order(terms)) < 0.2, (slope, estimates)
    slope = np.polyfit(np.log(steps), np.log(local_errors), 1)[0]
    assert abs(slope - (solver.order(terms) + 1)) < 0.2, (slope, local_errors)


# ---------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize(
    "solver",
    [
        # A small Krylov dimension (several substeps per sweep) halves the compile
        # time of this gradient: the projected exponential is compiled once per size
        # bucket, in every sweep of the forward and the backward pass.
        kx.Exprb32(krylov=kx.KrylovExpm(rtol=1e-12, max_krylov_dim=16)),
        pytest.param(kx.HochOst4(krylov=TIGHT), marks=pytest.mark.slow),
    ],
    ids=lambda s: type(s).__name__,
)
def test_gradient_recursive_checkpoint_vs_finite_differences(solver):
    t0, t1, dt = 0.0, 0.5, 0.125

    def loss(params, y0):
        sol = fixed_solve(solver, "semilinear", t0, t1, dt, y0, params)
        return jnp.sum(sol.ys[-1] ** 2)

    params = args_of((0.3, 1.0, 0.7))
    y0 = exact(0.0)
    g_params, g_y0 = jax.grad(loss, argnums=(0, 1))(params, y0)
    # Central differences at 1e-4: at 1e-6 the Krylov tolerance noise (about 1e-12
    # of the loss per evaluation) is 1% of the smallest derivative.
    eps = 1e-4
    for i in range(3):
        e = [jnp.asarray(eps if j == i else 0.0) for j in range(3)]
        plus = tuple(p + d for p, d in zip(params, e, strict=True))
        minus = tuple(p - d for p, d in zip(params, e, strict=True))
        fd = (loss(plus, y0) - loss(minus, y0)) / (2 * eps)
        assert jnp.allclose(g_params[i], fd, rtol=1e-5, atol=1e-7), (i, g_params, fd)
    direction = jnp.sin(3 * x)
    fd = (loss(params, y0 + eps * direction) - loss(params, y0 - eps * direction)) / (
        2 * eps
    )
    assert jnp.allclose(jnp.vdot(g_y0, direction), fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "adjoint",
    [kx.KrylovAdjoint(), pytest.param(kx.DirectAdjoint(), marks=pytest.mark.slow)],
    ids=["krylov", "direct"],
)
def test_forward_mode(adjoint):
    """`diffrax.ForwardMode()` through an exponential integrator, with the core's
    default adjoint (its block-exponential tangent) and with `DirectAdjoint`."""
    solver = kx.ETDRK2(krylov=kx.KrylovExpm(rtol=1e-12, adjoint=adjoint))

    @jax.jit
    def final(r):
        sol = diffrax.diffeqsolve(
            make_terms("semilinear"),
            solver,
            0.0,
            0.5,
            0.125,
            exact(0.0),
            args=(jnp.asarray(0.3), jnp.asarray(1.0), r),
            adjoint=diffrax.ForwardMode(),
        )
        return sol.ys[-1]

    r = jnp.asarray(0.7)
    _, tangent = jax.jvp(final, (r,), (jnp.ones_like(r),))
    eps = 1e-4
    fd = (final(r + eps) - final(r - eps)) / (2 * eps)
    assert rel_err(tangent, fd) < 1e-5


@pytest.mark.slow
def test_backsolve_adjoint():
    def loss(y0, adjoint):
        sol = diffrax.diffeqsolve(
            make_terms("semilinear"),
            kx.ExponentialEuler(),
            0.0,
            0.2,
            0.01,
            y0,
            args=args_of(ADVECTION),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    r = exact(0.0)
    # The adjoint system cannot be integrated by a krylovexp solver: clear refusal.
    with pytest.raises(ValueError, match="BacksolveAdjoint") as info:
        jax.eval_shape(jax.grad(loss), r, diffrax.BacksolveAdjoint())
    assert "RecursiveCheckpointAdjoint" in str(info.value)
    # Supported when the backward pass gets a Diffrax solver: the continuous adjoint
    # agrees with the discrete gradient up to the (first-order) discretisation error.
    backsolve = diffrax.BacksolveAdjoint(
        solver=diffrax.Tsit5(),
        stepsize_controller=diffrax.PIDController(rtol=1e-8, atol=1e-8),
    )
    g_back = jax.grad(loss)(r, backsolve)
    g_discrete = jax.grad(loss)(r, diffrax.RecursiveCheckpointAdjoint())
    assert rel_err(g_back, g_discrete) < 0.05


# ---------------------------------------------------------------------------------
# Pytree states, vmap, failures, bad terms.


@pytest.mark.slow
def test_pytree_state_matches_flat_state():
    half = n // 2

    def op_for(args):
        struct = {
            "a": jax.ShapeDtypeStruct((half,), jnp.float64),
            "b": jax.ShapeDtypeStruct((half,), jnp.float64),
        }

        def mv(tree):
            u = l_apply(jnp.concatenate([tree["a"], tree["b"]]), args)
            return {"a": u[:half], "b": u[half:]}

        return lx.FunctionLinearOperator(mv, struct)

    def n_tree(t, tree, args):
        out = nonlinear(t, jnp.concatenate([tree["a"], tree["b"]]), args)
        return {"a": out[:half], "b": out[half:]}

    y0 = exact(0.0)
    args = args_of(DIFFUSION)
    sol = diffrax.diffeqsolve(
        diffrax.MultiTerm(kx.LinearTerm(op_for), diffrax.ODETerm(n_tree)),
        kx.ExponentialEuler(krylov=TIGHT),
        0.0,
        0.5,
        0.0625,
        {"a": y0[:half], "b": y0[half:]},
        args=args,
    )
    flat = fixed_solve(
        kx.ExponentialEuler(krylov=TIGHT), "semilinear", 0.0, 0.5, 0.0625, y0, args
    )
    tree_final = jnp.concatenate([sol.ys["a"][-1], sol.ys["b"][-1]])
    assert jnp.allclose(tree_final, flat.ys[-1], rtol=1e-10, atol=1e-12)
    assert rel_err(tree_final, exact(0.5)) < 0.05


@pytest.mark.slow
def test_vmap_over_initial_conditions_and_parameters():
    solver = kx.ExponentialEuler(krylov=TIGHT)
    y0s = jnp.stack([exact(0.0), 0.5 * exact(0.0), exact(0.0) + 0.1])
    rs = jnp.asarray([1.0, 0.5, 0.0])

    def one(y0, r):
        args = (jnp.asarray(1.0), jnp.asarray(0.0), r)
        return fixed_solve(solver, "semilinear", 0.0, 0.5, 0.0625, y0, args).ys[-1]

    batched = jax.vmap(one)(y0s, rs)
    for i in range(3):
        assert jnp.allclose(batched[i], one(y0s[i], rs[i]), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_failure_result_codes():
    solver = kx.ExponentialEuler(krylov=TIGHT)
    args = args_of(DIFFUSION)
    # Too many steps: Diffrax's own code.
    sol = fixed_solve(solver, "semilinear", 0.0, 1.0, 1.0 / 128, exact(0.0), args)
    assert sol.result == diffrax.RESULTS.max_steps_reached
    # A non-finite state: the vector field overflows (r huge makes y³ blow up).
    sol = fixed_solve(
        solver, "semilinear", 0.0, 1.0, 0.25, exact(0.0), args_of((1.0, 0.0, 1e200))
    )
    assert sol.result == diffrax.RESULTS.nonfinite
    # The Krylov evaluation inside a step fails (substep budget exhausted).
    starved = kx.ExponentialEuler(
        krylov=kx.KrylovExpm(rtol=1e-12, max_krylov_dim=3, max_substeps=1)
    )
    sol = fixed_solve(starved, "semilinear", 0.0, 1.0, 0.5, exact(0.0), args)
    assert sol.result == diffrax.RESULTS.nonlinear_max_steps_reached
    # With a step-size controller such steps are rejected and retried smaller.
    sol = diffrax.diffeqsolve(
        make_terms("semilinear"),
        kx.Exprb32(krylov=kx.KrylovExpm(rtol=1e-10, max_krylov_dim=12, max_substeps=4)),
        0.0,
        0.2,
        0.2,
        exact(0.0),
        args=args,
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8),
        max_steps=200,
    )
    assert sol.result == diffrax.RESULTS.successful
    assert int(sol.stats["num_rejected_steps"]) > 0
    assert rel_err(sol.ys[-1], exact(0.2)) < 1e-4


@pytest.mark.parametrize(
    "solver",
    [
        kx.ExponentialEuler(),
        kx.ETDRK2(),
        kx.ETDRK4(),
        kx.HochOst4(),
        kx.Exprb32(),
        kx.Exprb43(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_bad_term_structure(solver):
    y0 = exact(0.0)
    wrong = [
        diffrax.MultiTerm(diffrax.ODETerm(nonlinear), kx.LinearTerm(linear_operator)),
        diffrax.MultiTerm(diffrax.ODETerm(nonlinear), diffrax.ODETerm(nonlinear)),
        kx.LinearTerm(linear_operator),
    ]
    if not isinstance(solver, (kx.Exprb32, kx.Exprb43)):
        wrong.append(diffrax.ODETerm(full))
    for terms in wrong:
        with pytest.raises(
            ValueError,
            match=r"MultiTerm\(LinearTerm\(\.\.\.\), "
            r"ODETerm\(\.\.\.\)\)",
        ):
            diffrax.diffeqsolve(
                terms, solver, 0.0, 1.0, 0.1, y0, args=args_of(DIFFUSION)
            )
    with pytest.raises(ValueError, match="LinearTerm"):
        diffrax.diffeqsolve(
            make_terms("semilinear"),
            kx.LinearExponential(),
            0.0,
            1.0,
            0.1,
            y0,
            args=args_of(DIFFUSION),
        )


def test_private_diffrax_api_present():
    """The one private Diffrax import (krylovexp/_diffrax_private.py): the classes
    exist where krylovexp takes them from, and are the ones Diffrax wraps terms in."""
    from krylovexp import _diffrax_private

    version = diffrax.__version__
    for name in ("AdjointTerm", "WrapTerm"):
        cls = getattr(_diffrax_private, name)
        assert issubclass(cls, diffrax.AbstractTerm), (
            f"diffrax {version}: {name} is no longer a Diffrax term"
        )
    wrapped = diffrax.MultiTerm(diffrax.ODETerm(lambda t, y, args: -y))
    assert isinstance(_diffrax_private.WrapTerm(wrapped, 1.0), diffrax.AbstractTerm)
