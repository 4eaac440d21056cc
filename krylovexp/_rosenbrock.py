"""Exponential Rosenbrock solvers: the step linearised at its start, with embedded
error estimates for adaptive steps (exprb32, exprb43).
"""

from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np

from ._dense_output import _NODES
from ._expm import KrylovExpm
from ._problem import _vf
from ._solver_base import (
    AbstractExponentialSolver,
    _at,
    _lin,
    _plus_each_row,
    _safe_inverse,
    _split_dense,
    _where,
    _zeros_like,
)


class _Linearisation:
    """`F(t0, y0)`, `∂F/∂t (t0, y0)`, the Jacobian operator `J` and the remainder
    differences `D = g(t, U) - g(t0, y0)`, `g(t, u) = F(t, u) - J u - v t`."""

    def __init__(self, problem, t0, y0, args, direction):
        self.problem = problem
        self.args = args
        self.t0 = t0
        self.y0 = y0
        if problem.kind == "general":
            term = problem.general
        else:
            term = problem.nonlinear

        def f_of_t(t):
            return _vf(term, t, y0, args)

        # Diffrax's wrapped vector field is `f(direction * t)`; the tangent
        # `direction` gives the physical `∂f/∂t`.
        tangent = jnp.asarray(direction, dtype=t0.dtype)
        f0, ft = jax.jvp(f_of_t, (t0,), (tangent,))

        def f_of_y(y, args):
            return _vf(term, t0, y, args)

        jac = lx.linearise(lx.JacobianLinearOperator(f_of_y, y0, args))
        self.jac_part = jac  # Jacobian of f (general) or of N (semilinear)
        if problem.kind == "general":
            self.operator = jac
            self.f0 = f0
        else:
            linear = problem.linear.make_operator(args)
            self.operator = lx.AddLinearOperator(linear, jac)
            self.f0 = _lin((1.0, linear.mv(y0)), (1.0, f0))
        self.n0 = f0  # f (general) or N (semilinear) at (t0, y0)
        self.v = ft
        self.term = term

    def remainder(self, t, c_h, u):
        """`g(t, u) - g(t0, y0)` at the stage time `t` (`c_h = t_phys - t0_phys`)."""
        fu = _vf(self.term, t, u, self.args)
        du = _lin((1.0, u), (-1.0, self.y0))
        jdu = self.jac_part.mv(du)
        return _lin((1.0, fu), (-1.0, self.n0), (-1.0, jdu), (-c_h, self.v))


def _direction(t0, t1, h):
    span = t1 - t0
    return jnp.where(span == 0, 1.0, h / jnp.where(span == 0, 1.0, span))


class Exprb32(diffrax.AbstractAdaptiveSolver, AbstractExponentialSolver):
    r"""Exponential Rosenbrock method of order 3 with an embedded order-2 solution
    (`exprb32` of Hochbruck & Ostermann).

    At each step the problem is linearised at `(t0, y0)`: `J = ∂F/∂y`, `v = ∂F/∂t`,
    `g(t, u) = F(t, u) - J u - v t`. Then

    - `U_2 = y0 + h phi_1(hJ) F(t0, y0) + h² phi_2(hJ) v` (exponential
      Rosenbrock–Euler, order 2: the embedded solution)
    - `D_2 = g(t0 + h, U_2) - g(t0, y0)`
    - `y1 = U_2 + 2h phi_3(hJ) D_2`.

    **Order:** 3 (stiff order 3). **Error estimator:** `y1 - U_2 = 2h phi_3(hJ) D_2`,
    the difference to the embedded second-order solution; local order 3, so
    `error_order = 3` for `diffrax.PIDController`.
    **Term structure:** a plain `diffrax.ODETerm(f)` (the Jacobian action comes from
    `lineax.JacobianLinearOperator`, i.e. JVPs of `f`; it is never formed), or the
    semilinear `diffrax.MultiTerm(krylovexp.LinearTerm(L), diffrax.ODETerm(N))` (then
    `J = L + ∂N/∂y`).
    **Cost per step:** two evaluations of the vector field, one JVP in `t`, one Jacobian
    linearisation, two `phimv` sweeps.

    **Arguments:** as [`krylovexp.LinearExponential`][].

    **References:** M. Hochbruck, A. Ostermann and J. Schweitzer, "Exponential
    Rosenbrock-type methods", SIAM J. Numer. Anal. 47 (2009); M. Hochbruck and
    A. Ostermann, "Exponential integrators", Acta Numerica 19 (2010), §2.4.
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _kinds: ClassVar[tuple[str, ...]] = ("semilinear", "general")

    def order(self, terms) -> int | None:
        return 3

    def error_order(self, terms) -> int | None:
        return 3

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        lin = _Linearisation(problem, t0, y0, args, _direction(t0, t1, h))
        zero = _zeros_like(y0)
        hinv = _safe_inverse(h)
        times = self._times(h)
        k = len(_NODES) + 1

        # Sweep 0: h phi_1(hJ) F0 + h² phi_2(hJ) v  -> U_2 = y0 + that.
        # Sweep 1: 2h phi_3(hJ) D_2 (the error estimate), b_3 = 2 D_2 / h².
        def vectors(i, aux):
            b3, _ = aux
            first = i == 0
            return (
                zero,
                _where(first, lin.f0, zero),
                _where(first, lin.v, zero),
                _where(first, zero, b3),
            )

        def update(i, values, aux):
            b3, outs = aux

            def remainder():
                u2 = _lin((1.0, y0), (1.0, _at(values, -1)))
                d2 = lin.remainder(t1, h, u2)
                return _lin((2 * hinv * hinv, d2))

            b3 = lax.cond(i == 0, remainder, lambda: b3)
            outs = jtu.tree_map(lambda o, v: o.at[i].set(v), outs, values)
            return b3, outs

        outs = jtu.tree_map(lambda y: jnp.zeros((2, k) + y.shape, y.dtype), y0)
        _, outs = tracker.sweeps(
            self._krylov(),
            lin.operator,
            2,
            vectors,
            lambda i: times,
            update,
            (zero, outs),
        )
        tracker.count(1)  # J (U_2 - y0) in the remainder
        increments = jtu.tree_map(lambda o: o[0] + o[1], outs)  # at h/3, 2h/3, h
        y_error = _at(_at(outs, 1), -1)
        values = _plus_each_row(y0, increments)
        y1, ym = _split_dense(values)
        return y1, y_error, ym


class Exprb43(diffrax.AbstractAdaptiveSolver, AbstractExponentialSolver):
    r"""Exponential Rosenbrock method of order 4 with an embedded order-3 solution
    (`exprb43` of Hochbruck & Ostermann).

    With the linearisation of [`krylovexp.Exprb32`][] (`J`, `v`, `g`) and
    `phi_j = phi_j(hJ)`:

    - `U_2 = y0 + (h/2) phi_1(hJ/2) F(t0, y0) + (h/2)² phi_2(hJ/2) v`
    - `U_3 = y0 + h phi_1 F(t0, y0) + h² phi_2 v + h phi_1 D_2`
    - `y1 = y0 + h phi_1 F(t0, y0) + h² phi_2 v + h (16 phi_3 - 48 phi_4) D_2
      + h (-2 phi_3 + 12 phi_4) D_3`

    with `D_i = g(t0 + c_i h, U_i) - g(t0, y0)`, `c = (0, 1/2, 1)`. The first `phimv`
    sweep gives the `phi_1, phi_2` terms at `h/2` and at `h` at once (a 1-D time array).

    **Order:** 4 (stiff order 4). **Error estimator:** the difference to the embedded
    third-order solution (same formula with `16 phi_3` and `-2 phi_3` only),
    `h phi_4 (-48 D_2 + 12 D_3)`; local order 4, so `error_order = 4`.
    **Term structure:** a plain `diffrax.ODETerm(f)` (Jacobian action by JVPs through
    `lineax.JacobianLinearOperator`, never formed) or the semilinear
    `diffrax.MultiTerm(krylovexp.LinearTerm(L), diffrax.ODETerm(N))` (`J = L + ∂N/∂y`).
    **Cost per step:** three evaluations of the vector field, one JVP in `t`, one
    Jacobian linearisation, four `phimv` sweeps.

    **Arguments:** as [`krylovexp.LinearExponential`][].

    **References:** M. Hochbruck, A. Ostermann and J. Schweitzer, "Exponential
    Rosenbrock-type methods", SIAM J. Numer. Anal. 47 (2009); M. Hochbruck and
    A. Ostermann, "Exponential integrators", Acta Numerica 19 (2010), §2.4.
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _kinds: ClassVar[tuple[str, ...]] = ("semilinear", "general")

    def order(self, terms) -> int | None:
        return 4

    def error_order(self, terms) -> int | None:
        return 4

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        lin = _Linearisation(problem, t0, y0, args, _direction(t0, t1, h))
        zero = _zeros_like(y0)
        hinv = _safe_inverse(h)
        h2inv = hinv * hinv
        h3inv = h2inv * hinv
        # Output times per sweep, each padded with h (outputs at the end time cost
        # nothing): A at h/3, h/2, 2h/3, h (index 1: U_2; index 3: the step); B at h
        # only; C and E at the dense-output nodes h/3, 2h/3 and at h.
        fractions = jnp.asarray(
            (
                (_NODES[0], 0.5, _NODES[1], 1.0),
                (1.0, 1.0, 1.0, 1.0),
                (_NODES[0], _NODES[1], 1.0, 1.0),
                (_NODES[0], _NODES[1], 1.0, 1.0),
            ),
            dtype=h.dtype,
        )
        t_half = t0 + 0.5 * (t1 - t0)

        # Sweep 0 (A): h phi_1 F0 + h² phi_2 v at all times; U_2 = y0 + A(h/2).
        # Sweep 1 (B): h phi_1(hJ) D_2;                     U_3 = y0 + A(h) + B(h).
        # Sweep 2 (C): h phi_3 (16 D_2 - 2 D_3),  b_3 = (16 D_2 - 2 D_3) / h².
        # Sweep 3 (E): h phi_4 (-48 D_2 + 12 D_3), b_4 = (-48 D_2 + 12 D_3) / h³.
        def vectors(i, aux):
            d2, d3, _ = aux
            b3 = _lin((16 * h2inv, d2), (-2 * h2inv, d3))
            b4 = _lin((-48 * h3inv, d2), (12 * h3inv, d3))
            return (
                zero,
                _where(i == 0, lin.f0, _where(i == 1, d2, zero)),
                _where(i == 0, lin.v, zero),
                _where(i == 2, b3, zero),
                _where(i == 3, b4, zero),
            )

        def update(i, values, aux):
            d2, d3, outs = aux
            outs = jtu.tree_map(lambda o, v: o.at[i].set(v), outs, values)

            def stage2():
                u2 = _lin((1.0, y0), (1.0, _at(values, 1)))
                return lin.remainder(t_half, 0.5 * h, u2), d3

            def stage3():
                a_end = jtu.tree_map(lambda o: o[0, -1], outs)
                u3 = _lin((1.0, y0), (1.0, a_end), (1.0, _at(values, -1)))
                return d2, lin.remainder(t1, h, u3)

            d2, d3 = lax.switch(jnp.minimum(i, 2), (stage2, stage3, lambda: (d2, d3)))
            return d2, d3, outs

        outs = jtu.tree_map(lambda y: jnp.zeros((4, 4) + y.shape, y.dtype), y0)
        _, _, outs = tracker.sweeps(
            self._krylov(),
            lin.operator,
            4,
            vectors,
            lambda i: h * fractions[i],
            update,
            (zero, zero, outs),
        )
        tracker.count(2)  # J (U_i - y0) in the two remainders
        # y(θh) - y0 = A + C + E at θ = 1/3, 2/3, 1 (A's time indices 0, 2, 3; C's
        # and E's 0, 1, 2).
        increments = jtu.tree_map(
            lambda o: o[0][np.array([0, 2, 3])] + o[2, :3] + o[3, :3], outs
        )
        y_error = jtu.tree_map(lambda o: o[3, -1], outs)
        values = _plus_each_row(y0, increments)
        y1, ym = _split_dense(values)
        return y1, y_error, ym
