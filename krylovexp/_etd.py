"""Exponential time differencing: the exponential Runge–Kutta solvers of `y' = L y` and
`y' = L y + N(t, y, args)` (exact linear, Euler, ETDRK2 with its embedded Euler
estimate, and the tableau-driven ETDRK4 and HochOst4).
"""

from typing import ClassVar, NamedTuple

import diffrax
import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._dense_output import _NODES
from ._expm import KrylovExpm
from ._problem import _vf
from ._solver_base import (
    AbstractExponentialSolver,
    _at,
    _combine,
    _lin,
    _repeat,
    _safe_inverse,
    _split_dense,
    _where,
    _zeros_like,
)


class LinearExponential(AbstractExponentialSolver):
    r"""Exact integrator for linear problems `y' = L y`: `y1 = exp(h L) y0`.

    **Order:** exact up to the Krylov tolerance; any step size is allowed (one step
    across the whole interval is fine).
    **Error estimator:** none (not adaptive); the accuracy is set by `krylov`.
    **Term structure:** `krylovexp.LinearTerm(L)`.
    **Cost per step:** one `expmv` (one adaptive Krylov sweep, also giving the dense
    output nodes).

    **Arguments:**

    - `krylov`: a [`krylovexp.KrylovExpm`][] configuration for the matrix exponential
        (method, tolerances, dimensions, adjoint). Default: `KrylovExpm()`.
    - `rtol`, `atol`: target tolerances (as you would give a step-size controller). They
        set the Krylov tolerances that `krylov` leaves unset to `0.1 * rtol`,
        `0.1 * atol`; with neither, the core's dtype defaults apply (relative 1e-8 in
        float64, 1e-5 in float32). So `krylov=KrylovExpm(method="lanczos")` for a
        symmetric operator or Jacobian keeps the controller's accuracy.

    **Reference:** Y. Saad, "Analysis of some Krylov subspace approximations to the
    matrix exponential operator", SIAM J. Numer. Anal. 29 (1992).
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _kinds: ClassVar[tuple[str, ...]] = ("linear",)
    _phi_sweeps: ClassVar[tuple[tuple[float, ...], ...] | None] = (_NODES + (1.0,),)
    _phi_order: ClassVar[int] = 0

    def order(self, terms) -> int | None:
        return None

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        operator = problem.linear.make_operator(args)
        krylov = self._krylov()
        values = tracker.add(tracker.phimv(krylov, operator, (y0,), self._times(h)))
        y1, ym = _split_dense(values)
        return y1, None, ym


class ExponentialEuler(AbstractExponentialSolver):
    r"""Exponential Euler (ETD1) for `y' = L y + N(t, y, args)`:

    `y1 = exp(hL) y0 + h phi_1(hL) N(t0, y0)`.

    **Order:** 1 (also in the stiff sense: the error constants do not depend on `‖L‖`).
    **Error estimator:** none; use fixed steps (for adaptive steps use
    [`krylovexp.Exprb32`][] or [`krylovexp.Exprb43`][]).
    **Term structure:** `MultiTerm(LinearTerm(L), ODETerm(N))`.
    **Cost per step:** one N evaluation, one `phimv` with `(b_0, b_1)`.

    **Arguments:** as [`krylovexp.LinearExponential`][].

    **Reference:** S. M. Cox and P. C. Matthews, "Exponential time differencing for
    stiff systems", J. Comput. Phys. 176 (2002); M. Hochbruck and A. Ostermann,
    "Exponential integrators", Acta Numerica 19 (2010), §2.
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _kinds: ClassVar[tuple[str, ...]] = ("semilinear",)
    _phi_sweeps: ClassVar[tuple[tuple[float, ...], ...] | None] = (_NODES + (1.0,),)
    _phi_order: ClassVar[int] = 1

    def order(self, terms) -> int | None:
        return 1

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        operator = problem.linear.make_operator(args)
        n0 = _vf(problem.nonlinear, t0, y0, args)
        krylov = self._krylov()
        values = tracker.add(tracker.phimv(krylov, operator, (y0, n0), self._times(h)))
        y1, ym = _split_dense(values)
        return y1, None, ym


class ETDRK2(diffrax.AbstractAdaptiveSolver, AbstractExponentialSolver):
    r"""Second-order exponential Runge–Kutta method ETD2RK of Cox & Matthews for
    `y' = L y + N(t, y, args)`, with exponential Euler embedded:

    `a = exp(hL) y0 + h phi_1(hL) N(t0, y0)` (exponential Euler, order 1),
    `y1 = a + h phi_2(hL) (N(t0 + h, a) - N(t0, y0))`.

    **Order:** 2 (stiff order 2).
    **Error estimator:** `y1 - a = h phi_2(hL) (N(t0 + h, a) - N(t0, y0))`, the
    difference to the embedded exponential Euler solution; local order 2, so
    `error_order = 2`. Fixed steps (`diffrax.ConstantStepSize`) ignore it;
    `diffrax.PIDController` makes the scheme adaptive at no extra cost.
    **Term structure:** `MultiTerm(LinearTerm(L), ODETerm(N))`.
    **Cost per step:** two N evaluations, two `phimv` sweeps.

    **Arguments:** as [`krylovexp.LinearExponential`][].

    **References:** S. M. Cox and P. C. Matthews, "Exponential time differencing for
    stiff systems", J. Comput. Phys. 176 (2002), eq. (22); P. Whalen, M. Brio and
    J. V. Moloney, "Exponential time-differencing with embedded Runge–Kutta adaptive
    step control", J. Comput. Phys. 280 (2015).
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _kinds: ClassVar[tuple[str, ...]] = ("semilinear",)
    _phi_sweeps: ClassVar[tuple[tuple[float, ...], ...] | None] = (_NODES + (1.0,),) * 2
    _phi_order: ClassVar[int] = 2

    def order(self, terms) -> int | None:
        return 2

    def error_order(self, terms) -> int | None:
        return 2

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        operator = problem.linear.make_operator(args)
        nonlinear = problem.nonlinear
        n0 = _vf(nonlinear, t0, y0, args)
        hinv = _safe_inverse(h)
        times = self._times(h)
        zero = _zeros_like(y0)

        # Sweep 0: a = exp(hL) y0 + h phi_1 N0 (b_2 = 0).
        # Sweep 1: y1 - a = h phi_2 (N(t1, a) - N0), i.e. b_0 = b_1 = 0 and
        # b_2 = (N(t1, a) - N0) / h: the error estimate, and the correction of the
        # dense output at every node.
        def vectors(i, aux):
            b2, _ = aux
            first = i == 0
            return (_where(first, y0, zero), _where(first, n0, zero), b2)

        def update(i, values, aux):
            b2, outs = aux

            def slope():
                na = _vf(nonlinear, t1, _at(values, -1), args)
                return _lin((hinv, na), (-hinv, n0))

            b2 = lax.cond(i == 0, slope, lambda: b2)
            outs = jtu.tree_map(lambda o, v: o.at[i].set(v), outs, values)
            return b2, outs

        k = len(_NODES) + 1
        outs = jtu.tree_map(lambda y: jnp.zeros((2, k) + y.shape, y.dtype), y0)
        _, outs = tracker.sweeps(
            self._krylov(), operator, 2, vectors, lambda i: times, update, (zero, outs)
        )
        values = jtu.tree_map(lambda o: o[0] + o[1], outs)
        y_error = _at(_at(outs, 1), -1)
        y1, ym = _split_dense(values)
        return y1, y_error, ym


class _Tableau(NamedTuple):
    """An exponential Runge–Kutta step as `phimv` sweeps: sweep `i` evaluates
    `phimv(L, (head_i y0, head_i G_1, b_2, b_3), tau_i h)` with
    `b_2 = sum_k b2[i][k] G_k / h` and `b_3 = sum_k b3[i][k] G_k / h²`. Its end value
    (plus the value of the previous sweep when that one is `partial`) is the stage
    `U_{stage[i]+1}`, whose `G = N(t0 + c[i] h, U)` is stored; `stage[i] = -1`: none
    (a partial sweep, or the last one, `y1`)."""

    tau: tuple[float, ...]
    head: tuple[int, ...]
    b2: tuple[tuple[float, ...], ...]
    b3: tuple[tuple[float, ...], ...]
    stage: tuple[int, ...]
    c: tuple[float, ...]
    partial: tuple[bool, ...]

    @property
    def phi_sweeps(self) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(t * s for s in _NODES + (1.0,)) for t in self.tau)


# Krogstad's ETDRK4: U_2, U_3, U_4, then y1.
_ETDRK4_TABLEAU = _Tableau(
    tau=(0.5, 0.5, 1.0, 1.0),
    head=(1, 1, 1, 1),
    b2=((0, 0, 0, 0), (-4, 4, 0, 0), (-2, 0, 2, 0), (-3, 2, 2, -1)),
    b3=((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), (4, -4, -4, 4)),
    stage=(1, 2, 3, -1),
    c=(0.5, 0.5, 1.0, 0.0),
    partial=(False, False, False, False),
)

# Hochbruck–Ostermann: U_2, U_3, U_4, the h/2 part of U_5, its h part, then y1.
_HOCHOST4_TABLEAU = _Tableau(
    tau=(0.5, 0.5, 1.0, 0.5, 1.0, 1.0),
    head=(1, 1, 1, 1, 0, 1),
    b2=(
        (0, 0, 0, 0, 0),
        (-4, 4, 0, 0, 0),
        (-2, 1, 1, 0, 0),
        (-3, 2, 2, -1, 0),
        (-0.25, 0.25, 0.25, -0.25, 0),
        (-3, 0, 0, -1, 4),
    ),
    b3=(
        (0, 0, 0, 0, 0),
        (0, 0, 0, 0, 0),
        (0, 0, 0, 0, 0),
        (4, -4, -4, 4, 0),
        (1, -1, -1, 1, 0),
        (4, 0, 0, 4, -8),
    ),
    stage=(1, 2, 3, -1, 4, -1),
    c=(0.5, 0.5, 1.0, 0.0, 0.5, 0.0),
    partial=(False, False, False, True, False, False),
)


class _AbstractTableauSolver(AbstractExponentialSolver):
    """An exponential Runge–Kutta method of classical order 4 given by its `_Tableau`:
    the step, the phi-table sweep times and the order follow from it."""

    _tableau: ClassVar[_Tableau]
    _kinds: ClassVar[tuple[str, ...]] = ("semilinear",)
    _phi_order: ClassVar[int] = 3

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_tableau" in cls.__dict__:
            cls._phi_sweeps = cls._tableau.phi_sweeps

    def order(self, terms) -> int | None:
        return 4

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        return _tableau_step(self, self._tableau, problem, t0, t1, h, y0, args, tracker)


class ETDRK4(_AbstractTableauSolver):
    r"""Fourth-order exponential Runge–Kutta method of Krogstad (ETDRK4-B) for
    `y' = L y + N(t, y, args)`.

    With `phi_j = phi_j(hL)`, `phi_{j,2} = phi_j(hL/2)` and `G_i = N(t0 + c_i h, U_i)`,
    `c = (0, 1/2, 1/2, 1)`:

    - `U_2 = exp(hL/2) y0 + (h/2) phi_{1,2} G_1`
    - `U_3 = exp(hL/2) y0 + (h/2) phi_{1,2} G_1 + h phi_{2,2} (G_2 - G_1)`
    - `U_4 = exp(hL) y0 + h phi_1 G_1 + 2h phi_2 (G_3 - G_1)`
    - `y1 = exp(hL) y0 + h [phi_1 G_1 + phi_2 (-3G_1 + 2G_2 + 2G_3 - G_4)
      + 4 phi_3 (G_1 - G_2 - G_3 + G_4)]`

    Each line is one `phimv` sweep (`sum_j t^j phi_j(tL) b_j` with `t = h/2` or `h`),
    four per step; the last one also gives the dense-output nodes.

    **Why Krogstad and not Cox–Matthews:** both have classical order 4 and the same
    cost here, but Krogstad's internal stages satisfy more of the stiff order
    conditions of Hochbruck & Ostermann (2005): its worst-case order for stiff
    parabolic problems is 3, against 2 for Cox–Matthews' ETDRK4, whose stage `U_4` is
    built from `U_2` rather than from `y0`. On problems with smooth, compatible data
    both reach 4.

    **Order:** 4 (stiff order 3 in the worst case).
    **Error estimator:** none; use fixed steps.
    **Term structure:** `MultiTerm(LinearTerm(L), ODETerm(N))`.
    **Cost per step:** four N evaluations, four `phimv` sweeps.

    **Arguments:** as [`krylovexp.LinearExponential`][].

    **References:** S. Krogstad, "Generalized integrating factor methods for stiff
    PDEs", J. Comput. Phys. 203 (2005); M. Hochbruck and A. Ostermann, "Explicit
    exponential Runge–Kutta methods for semilinear parabolic problems", SIAM J. Numer.
    Anal. 43 (2005); S. M. Cox and P. C. Matthews, J. Comput. Phys. 176 (2002).
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _tableau: ClassVar[_Tableau] = _ETDRK4_TABLEAU


class HochOst4(_AbstractTableauSolver):
    r"""Fourth-order exponential Runge–Kutta method of Hochbruck and Ostermann
    (2005, eq. (5.19)) for `y' = L y + N(t, y, args)`: five stages that satisfy all
    the stiff order conditions of order 4, so the order holds for stiff parabolic
    problems (bounded `N`, `L` generating an analytic semigroup), where
    [`krylovexp.ETDRK4`][] may drop to 3.

    With `phi_{j,i} = phi_j(c_i h L)`, `c = (0, 1/2, 1/2, 1, 1/2)`,
    `G_i = N(t0 + c_i h, U_i)` and `D = G_2 + G_3 - G_1 - G_4`:

    - `U_2 = exp(hL/2) y0 + (h/2) phi_{1,2} G_1`
    - `U_3 = exp(hL/2) y0 + h [phi_{1,3} G_1 / 2 + phi_{2,3} (G_2 - G_1)]`
    - `U_4 = exp(hL) y0 + h [phi_{1,4} G_1 + phi_{2,4} (G_2 + G_3 - 2 G_1)]`
    - `U_5 = exp(hL/2) y0 + h [phi_{1,5} G_1 / 2 + phi_{2,5} (G_4 - G_1) / 4
      + (phi_{2,5} / 2 - phi_{3,5} / 2 + phi_{2,4} / 4 - phi_{3,4}) D]`
    - `y1 = exp(hL) y0 + h [phi_1 G_1 + phi_2 (4 G_5 - 3 G_1 - G_4)
      + phi_3 (4 G_1 + 4 G_4 - 8 G_5)]`

    Each line is one `phimv` sweep at `t = h/2` or `h`, except `U_5`, which mixes
    both and takes two; six per step, the last one also giving the dense-output
    nodes.

    **Order:** 4, also in the stiff sense.
    **Error estimator:** none; use fixed steps.
    **Term structure:** `MultiTerm(LinearTerm(L), ODETerm(N))`.
    **Cost per step:** five N evaluations, six `phimv` sweeps.

    **Arguments:** as [`krylovexp.LinearExponential`][].

    **References:** M. Hochbruck and A. Ostermann, "Explicit exponential Runge–Kutta
    methods for semilinear parabolic problems", SIAM J. Numer. Anal. 43 (2005);
    M. Hochbruck and A. Ostermann, "Exponential integrators", Acta Numerica 19 (2010).
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _tableau: ClassVar[_Tableau] = _HOCHOST4_TABLEAU


def _tableau_step(solver, tableau, problem, t0, t1, h, y0, args, tracker):
    """One step of an exponential Runge–Kutta method given as a `_Tableau`: all its
    sweeps in one `tracker.sweeps` loop; the last one also gives the dense output."""
    operator = problem.linear.make_operator(args)
    nonlinear = problem.nonlinear
    hinv = _safe_inverse(h)
    dtype = h.dtype
    num_sweeps = len(tableau.tau)
    num_stages = len(tableau.b2[0])
    tau = jnp.asarray(tableau.tau, dtype=dtype)
    head = jnp.asarray(tableau.head, dtype=dtype)
    b2_table = jnp.asarray(tableau.b2, dtype=dtype)
    b3_table = jnp.asarray(tableau.b3, dtype=dtype)
    c = jnp.asarray(tableau.c, dtype=dtype)
    stage_of = jnp.asarray(tableau.stage)
    with_partials = any(tableau.partial)
    partial = jnp.asarray(tableau.partial)
    nodes = jnp.asarray(_NODES + (1.0,), dtype=dtype)
    g1 = _vf(nonlinear, t0, y0, args)

    def vectors(i, aux):
        gs = aux[0]
        b2 = _combine(b2_table[i] * hinv, gs)
        b3 = _combine(b3_table[i] * hinv * hinv, gs)
        if all(tableau.head):
            return (y0, g1, b2, b3)
        return (_lin((head[i], y0)), _lin((head[i], g1)), b2, b3)

    def update(i, values, aux):
        gs, part = aux[0], aux[1]
        end = _at(values, -1)

        def stage():
            u = _lin((1.0, end), (1.0, part)) if with_partials else end
            g = _vf(nonlinear, t0 + c[i] * (t1 - t0), u, args)
            return jtu.tree_map(lambda a, b: a.at[stage_of[i]].set(b), gs, g)

        gs = lax.cond(stage_of[i] >= 0, stage, lambda: gs)
        if with_partials:
            # A partial sweep's value waits for the next sweep; others clear it.
            part = jtu.tree_map(
                lambda e: jnp.where(partial[i], e, jnp.zeros_like(e)), end
            )
        return gs, part, values

    gs = jtu.tree_map(
        lambda g: jnp.zeros((num_stages,) + g.shape, g.dtype).at[0].set(g), g1
    )
    part = _zeros_like(y0) if with_partials else None
    aux = (gs, part, _repeat(y0, len(_NODES) + 1))
    _, _, values = tracker.sweeps(
        solver._krylov(),
        operator,
        num_sweeps,
        vectors,
        lambda i: tau[i] * h * nodes,
        update,
        aux,
    )
    y1, ym = _split_dense(values)
    return y1, None, ym
