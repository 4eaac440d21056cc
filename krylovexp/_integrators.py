"""Exponential integrators as Diffrax solvers.

Every phi-function evaluation goes through [`krylovexp.KrylovExpm.phimv`][] /
[`krylovexp.KrylovExpm.expmv`][]: one adaptive Krylov sweep of the augmented operator
per call gives a whole linear combination `sum_j t^j phi_j(tA) b_j`, at one or several
times.
"""

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, PyTree, Real

from ._diagonal import (
    PhiTable,
    is_diagonal_operator,
    make_table,
    table_phimv,
)
from ._diffrax_private import AdjointTerm, WrapTerm
from ._expm import KrylovExpm
from ._solution import RESULTS as KRYLOV_RESULTS
from ._terms import LinearTerm


# Krylov tolerances derived from the solver's `rtol`/`atol`: well below the local
# error that a step-size controller with those tolerances accepts.
_KRYLOV_SAFETY = 0.01
# Interior nodes of the continuous extension kept for dense output.
_NODES = (1.0 / 3.0, 2.0 / 3.0)

_SEMILINEAR = "MultiTerm(LinearTerm(...), ODETerm(...))"


# ---------------------------------------------------------------------------------
# Dense output.


def _lagrange_to_monomial() -> np.ndarray:
    nodes = np.array((0.0,) + _NODES + (1.0,))
    vandermonde = np.vander(nodes, increasing=False)  # rows: [θ³, θ², θ, 1]
    return np.linalg.inv(vandermonde)


_LAGRANGE = _lagrange_to_monomial()


class ExponentialInterpolation(diffrax.AbstractLocalInterpolation):
    """Dense output of the krylovexp solvers.

    Each step evaluates its continuous extension (the exact solution of the linear or
    linearised problem with the step's polynomial approximation of the nonlinearity,
    `sum_j (θh)^j phi_j(θhA) b_j`) at `θ = 1/3, 2/3` in the same Krylov sweep that gives
    the end point; this class interpolates the cubic through `θ = 0, 1/3, 2/3, 1`.
    The values at the nodes are those of the continuous extension; in between the
    local error is `O(h⁴)` times the fourth time derivative of the solution.
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    coeffs: PyTree[Array]

    def __init__(
        self,
        *,
        t0: Real[ArrayLike, ""],
        t1: Real[ArrayLike, ""],
        y0: PyTree[Array],
        y1: PyTree[Array],
        ym: PyTree[Array],
    ):
        def _coeffs(a, m, b):
            values = jnp.concatenate([a[None], m, b[None]])
            matrix = jnp.asarray(_LAGRANGE, dtype=jnp.result_type(values.dtype, float))
            out = jnp.tensordot(matrix, values, axes=1)
            return out.astype(values.dtype)

        self.t0 = jnp.asarray(t0)
        self.t1 = jnp.asarray(t1)
        self.coeffs = jtu.tree_map(_coeffs, y0, ym, y1)

    def evaluate(
        self,
        t0: Real[ArrayLike, ""],
        t1: Real[ArrayLike, ""] | None = None,
        left: bool = True,
    ) -> PyTree[Array]:
        del left
        if t1 is not None:
            return jtu.tree_map(
                lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0)
            )
        span = self.t1 - self.t0
        theta = (t0 - self.t0) / jnp.where(span == 0, 1, span)

        def _eval(c):
            with jax.numpy_dtype_promotion("standard"):
                return jnp.polyval(c, theta.astype(c.dtype))

        return jtu.tree_map(_eval, self.coeffs)


# ---------------------------------------------------------------------------------
# Terms.


def _unwrap(term):
    while isinstance(term, WrapTerm):
        term = term.term
    return term


def _scalar_control(term) -> bool:
    try:
        control = eqx.filter_eval_shape(term.contr, 0.0, 1.0)
    except Exception:  # noqa: BLE001
        return False
    leaves = jtu.tree_leaves(control)
    # A bare term's control may be a Python float (Diffrax wraps terms into arrays).
    return len(leaves) == 1 and jnp.ndim(leaves[0]) == 0


def _describe(terms) -> str:
    if isinstance(terms, diffrax.MultiTerm):
        inner = ", ".join(_describe(t) for t in terms.terms)
        return f"MultiTerm({inner})"
    term = _unwrap(terms)
    if isinstance(term, diffrax.AbstractTerm):
        return f"{type(term).__name__}(...)"
    return type(term).__name__


class _Problem:
    """The validated terms of a step: `kind` is "linear", "semilinear" or "general"."""

    def __init__(self, kind, linear=None, nonlinear=None, general=None):
        self.kind = kind
        self.linear = linear  # unwrapped LinearTerm
        self.nonlinear = nonlinear  # (wrapped) term of N
        self.general = general  # (wrapped) term of f


def _has_adjoint_term(terms) -> bool:
    leaves = jtu.tree_leaves(
        terms, is_leaf=lambda x: isinstance(x, diffrax.AbstractTerm)
    )
    for leaf in leaves:
        if isinstance(leaf, diffrax.MultiTerm):
            if _has_adjoint_term(leaf.terms):
                return True
        elif isinstance(_unwrap(leaf), AdjointTerm):
            return True
    return False


def _classify(name: str, terms, kinds: tuple[str, ...]) -> _Problem:
    if _has_adjoint_term(terms):
        raise ValueError(
            f"`{name}` cannot integrate the adjoint system that "
            "`diffrax.BacksolveAdjoint` builds (it is not of the form "
            f"`{_SEMILINEAR}`). Use the default "
            "`adjoint=diffrax.RecursiveCheckpointAdjoint()`, or "
            "`diffrax.ForwardMode()` with "
            "`krylov=krylovexp.KrylovExpm(adjoint=krylovexp.DirectAdjoint())`, or give "
            "the backward pass a Diffrax solver: "
            "`adjoint=diffrax.BacksolveAdjoint(solver=diffrax.Kvaerno5())`."
        )
    if isinstance(terms, diffrax.MultiTerm):
        if (
            "semilinear" in kinds
            and len(terms.terms) == 2
            and isinstance(_unwrap(terms.terms[0]), LinearTerm)
            and not isinstance(terms.terms[1], diffrax.MultiTerm)
            and not isinstance(_unwrap(terms.terms[1]), LinearTerm)
            and _scalar_control(terms.terms[1])
        ):
            return _Problem(
                "semilinear", linear=_unwrap(terms.terms[0]), nonlinear=terms.terms[1]
            )
    elif isinstance(terms, diffrax.AbstractTerm):
        term = _unwrap(terms)
        if isinstance(term, LinearTerm):
            if "linear" in kinds:
                return _Problem("linear", linear=term)
        elif "general" in kinds and _scalar_control(terms):
            return _Problem("general", general=terms)
    expected = []
    if "semilinear" in kinds:
        expected.append(
            f"`terms=diffrax.{_SEMILINEAR}` for a semilinear problem "
            "y' = L y + N(t, y, args) (the linear term first; "
            "`MultiTerm(LinearTerm(...), ODETerm(...))`)"
        )
    if "linear" in kinds:
        expected.append("`terms=krylovexp.LinearTerm(...)` for y' = L y")
    if "general" in kinds:
        expected.append("`terms=diffrax.ODETerm(...)` for y' = f(t, y, args)")
    hint = ""
    if (
        isinstance(terms, diffrax.MultiTerm)
        and len(terms.terms) == 2
        and isinstance(_unwrap(terms.terms[1]), LinearTerm)
    ):
        hint = (
            " (The linear term comes first: Diffrax's IMEX solvers take "
            "`MultiTerm(explicit, implicit)`, krylovexp takes "
            "`MultiTerm(LinearTerm(L), ODETerm(N))`.)"
        )
    raise ValueError(
        f"`{name}` expects "
        + ", or ".join(expected)
        + f"; got `{_describe(terms)}`."
        + hint
    )


def _vf(term, t, y, args):
    """The vector field of an ODE-like (scalar-control) term, through Diffrax's
    wrappers: `term.vf_prod` with a unit control."""
    one = jnp.ones((), dtype=jnp.result_type(t))
    return term.vf_prod(t, y, args, one)


# ---------------------------------------------------------------------------------
# Small pytree arithmetic.


def _lin(*pairs):
    """`sum_i c_i x_i` over pytrees `x_i`, keeping the dtype of the first pytree."""
    coefs, trees = zip(*pairs, strict=True)

    def combine(*leaves):
        dtype = leaves[0].dtype
        out = None
        for c, leaf in zip(coefs, leaves, strict=True):
            term = (jnp.asarray(c) * leaf).astype(dtype)
            out = term if out is None else out + term
        return out

    return jtu.tree_map(combine, *trees)


def _zeros_like(tree):
    return jtu.tree_map(jnp.zeros_like, tree)


def _at(tree, i):
    return jtu.tree_map(lambda x: x[i], tree)


def _stack_nodes(tree, idx):
    if list(idx) == list(range(idx[0], idx[-1] + 1)):
        # A slice, not a gather: XLA fuses it with whatever produces the rows.
        return jtu.tree_map(lambda x: x[idx[0] : idx[-1] + 1], tree)
    return jtu.tree_map(lambda x: x[np.asarray(idx)], tree)


def _where(pred, a, b):
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def _combine(coefs, stacked):
    """`sum_k coefs[k] x_k` for a pytree whose leaves stack the `x_k` on axis 0.
    Elementwise multiply-adds rather than a contraction: a few terms, and XLA fuses
    them with their neighbours."""

    def combine(x):
        coefs_x = coefs.astype(x.dtype)
        return sum(coefs_x[k] * x[k] for k in range(x.shape[0]))

    return jtu.tree_map(combine, stacked)


def _repeat(tree, k):
    return jtu.tree_map(lambda x: jnp.zeros((k,) + x.shape, x.dtype), tree)


def _all_finite(tree) -> Bool[Array, ""]:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _safe_inverse(h):
    return jnp.where(h == 0, 0.0, 1.0 / jnp.where(h == 0, 1.0, h))


# ---------------------------------------------------------------------------------
# Solvers.


def _budget_ok(result) -> Bool[Array, ""]:
    """False when the Krylov evaluation ran out of substeps or could not meet its
    tolerance (as opposed to meeting non-finite numbers)."""
    return (result != KRYLOV_RESULTS.max_substeps_reached) & (
        result != KRYLOV_RESULTS.tolerance_not_met
    )


class _Tracker:
    """Collects the Krylov result flags and matvec counts of one step, and evaluates
    its phi-functions (from the step's `PhiTable` when the solver keeps one)."""

    def __init__(self, table: PhiTable | None = None, rows=None):
        self.ok = []
        self.budget_ok = []
        self.matvecs = []
        self.table = table
        self.rows = rows  # table rows of each sweep's times

    def phimv(self, krylov, operator, vectors, times, sweep=0):
        if self.table is None:
            return krylov.phimv(operator, vectors, times)
        return table_phimv(
            self.table, self.rows[sweep], vectors, times, krylov.max_substeps
        )

    def add(self, sol):
        self.ok.append(sol.result == KRYLOV_RESULTS.successful)
        self.budget_ok.append(_budget_ok(sol.result))
        self.matvecs.append(sol.stats["num_matvecs"])
        return sol.value

    def count(self, n):
        self.matvecs.append(jnp.asarray(n))

    def sweeps(self, krylov, operator, num, vectors_fn, times_fn, update_fn, aux):
        """Run `num` dependent `phimv` sweeps as one `lax.scan`.

        Iteration `i` evaluates `phimv(operator, vectors_fn(i, aux), times_fn(i))` and
        then `aux = update_fn(i, values, aux)`. One call site means one compiled Krylov
        loop per solver, whatever its number of stages.
        """

        def body(carry, i):
            aux, ok, budget_ok, matvecs = carry
            sol = self.phimv(krylov, operator, vectors_fn(i, aux), times_fn(i), i)
            ok = ok & (sol.result == KRYLOV_RESULTS.successful)
            budget_ok = budget_ok & _budget_ok(sol.result)
            matvecs = matvecs + sol.stats["num_matvecs"].astype(matvecs.dtype)
            aux = update_fn(i, sol.value, aux)
            return (aux, ok, budget_ok, matvecs), None

        init = (aux, jnp.array(True), jnp.array(True), jnp.array(0, dtype=jnp.int32))
        if self.table is None:
            (aux, ok, budget_ok, matvecs), _ = lax.scan(body, init, jnp.arange(num))
        else:
            # Table lookups are a few multiply-adds: unrolled, with static sweep
            # indices, the stage logic is resolved at trace time and XLA fuses
            # each stage into a handful of kernels.
            carry = init
            for i in range(num):
                carry, _ = body(carry, i)
            aux, ok, budget_ok, matvecs = carry
        self.ok.append(ok)
        self.budget_ok.append(budget_ok)
        self.matvecs.append(matvecs)
        return aux

    def finish(self, y1, y_error, dense_ys, state):
        krylov_ok = jnp.all(jnp.stack(self.ok))
        budget_ok = jnp.all(jnp.stack(self.budget_ok))
        finite = _all_finite(y1)
        if self.table is None:
            # With exact diagonal coefficients, |tau^j phi_j(tau L)| at the interior
            # nodes is bounded by its values at 0 and h: finite y1 (and stages)
            # imply finite nodes, and checking them would recompute them.
            finite = finite & _all_finite(dense_ys)
        if y_error is not None:
            finite = finite & _all_finite(y_error)
        # A Krylov evaluation that ran out of substeps returns NaN: report the cause.
        result = diffrax.RESULTS.where(
            budget_ok,
            diffrax.RESULTS.where(
                finite & krylov_ok,
                diffrax.RESULTS.successful,
                diffrax.RESULTS.nonfinite,
            ),
            diffrax.RESULTS.nonlinear_max_steps_reached,
        )
        if y_error is not None:
            ok = krylov_ok & finite
            y_error = jtu.tree_map(lambda e: jnp.where(ok, e, jnp.inf), y_error)
        total = sum(jnp.asarray(m).astype(state.dtype) for m in self.matvecs)
        return y_error, result, state + total


class AbstractExponentialSolver(diffrax.AbstractSolver):
    """Base class of the krylovexp exponential integrators.

    Subclasses declare which term structures they accept (`_kinds`) and implement
    `_step`. The solver state is the running count of operator applications (Krylov
    matvecs plus explicit operator/Jacobian products) over the accepted steps; it is
    returned as `sol.solver_state` when `diffrax.diffeqsolve` is called with
    `saveat=diffrax.SaveAt(..., solver_state=True)`. When the linear operator is
    diagonal (see [`krylovexp.KrylovExpm`][]), the fixed-step solvers
    (`LinearExponential`, `ExponentialEuler`, `ETDRK2`, `ETDRK4`) keep the
    coefficients `tau^j phi_j(tau L)` of their step in the state as well, as a pair
    `(count, table)`, and recompute them only when the step size changes.
    """

    krylov: eqx.AbstractVar[KrylovExpm | None]
    rtol: eqx.AbstractVar[float | None]
    atol: eqx.AbstractVar[float | None]

    # Diffrax's own structural check accepts any term; `init`/`step` check the
    # structure themselves so that the error names the expected structure.
    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., ExponentialInterpolation]] = (
        ExponentialInterpolation
    )
    _kinds: ClassVar[tuple[str, ...]]
    # For the coefficient table of a diagonal operator (None: no table): per phimv
    # sweep of `_step`, the fractions of the step at which it evaluates, and the
    # highest phi order.
    _phi_sweeps: ClassVar[tuple[tuple[float, ...], ...] | None] = None
    _phi_order: ClassVar[int] = 0

    def _phi_table_layout(self):
        """The table's time scales (sorted, distinct) and each sweep's rows."""
        scales = tuple(sorted({s for sweep in self._phi_sweeps for s in sweep}))
        rows = tuple(
            tuple(scales.index(s) for s in sweep) for sweep in self._phi_sweeps
        )
        return scales, rows

    def _krylov(self) -> KrylovExpm:
        if self.krylov is not None:
            krylov = self.krylov
        else:
            rtol = None if self.rtol is None else _KRYLOV_SAFETY * self.rtol
            atol = None if self.atol is None else _KRYLOV_SAFETY * self.atol
            krylov = KrylovExpm(rtol=rtol, atol=atol)
        if krylov.throw:
            # Failures become Diffrax result codes (and rejected adaptive steps).
            krylov = dataclasses.replace(krylov, throw=False)
        return krylov

    def _problem(self, terms) -> _Problem:
        return _classify(type(self).__name__, terms, self._kinds)

    def init(self, terms, t0, t1, y0, args):
        problem = self._problem(terms)
        count = jnp.asarray(0, dtype=jnp.int32)
        if self._phi_sweeps is None or problem.kind == "general":
            return count
        operator = problem.linear.make_operator(args)
        if not is_diagonal_operator(operator):
            return count
        h = _signed_step(problem, terms, jnp.asarray(t0), jnp.asarray(t1))
        scales, _ = self._phi_table_layout()
        return count, make_table(operator, h, scales, self._phi_order)

    def func(self, terms, t0, y0, args) -> PyTree[Array]:
        problem = self._problem(terms)
        if problem.kind == "general":
            return _vf(problem.general, t0, y0, args)
        operator = problem.linear.make_operator(args)
        out = operator.mv(y0)
        if problem.kind == "semilinear":
            out = _lin((1.0, out), (1.0, _vf(problem.nonlinear, t0, y0, args)))
        return out

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        problem = self._problem(terms)
        t0 = jnp.asarray(t0)
        t1 = jnp.asarray(t1)
        h = _signed_step(problem, terms, t0, t1)
        count, table = (
            solver_state if isinstance(solver_state, tuple) else (solver_state, None)
        )

        def attempt(tracker):
            y1, y_error, ym = self._step(problem, t0, t1, h, y0, args, tracker)
            y_error, result, new_count = tracker.finish(y1, y_error, ym, count)
            return y1, y_error, ym, result, new_count

        if table is None:
            y1, y_error, ym, result, count = attempt(_Tracker())
            state = count
        else:
            # Steps equal to within the rounding of the time variable use the table.
            # The table path runs unconditionally, outside control flow, so that
            # the table stays a loop invariant (reverse mode does not store it per
            # step); a step of another size is redone with exact phi-functions, in
            # a rematerialised branch that stores nothing for reverse mode.
            slack = 16 * jnp.finfo(h.dtype).eps * (jnp.abs(t0) + jnp.abs(t1))
            _, rows = self._phi_table_layout()
            looked_up = attempt(_Tracker(table, rows))
            y1, y_error, ym, result, count = lax.cond(
                jnp.abs(h - table.step) <= slack,
                lambda: looked_up,
                jax.checkpoint(lambda: attempt(_Tracker())),
            )
            state = (count, table)
        dense_info = dict(y0=y0, y1=y1, ym=ym)
        return y1, y_error, dense_info, state, result

    def _times(self, h):
        """Output times of the last Krylov sweep: the dense-output nodes and `h`."""
        return h * jnp.asarray(_NODES + (1.0,), dtype=h.dtype)

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        raise NotImplementedError


def _signed_step(problem, terms, t0, t1):
    """The signed step (Diffrax normalises time so that t0 < t1 and keeps the
    direction in the control)."""
    if problem.kind == "semilinear":
        h = terms.terms[0].contr(t0, t1)
    else:
        h = terms.contr(t0, t1)
    return jnp.asarray(h)


def _split_dense(values):
    """Values at (1/3, 2/3, 1) -> (value at 1, stacked interior values)."""
    return _at(values, -1), _stack_nodes(values, [0, 1])


class LinearExponential(AbstractExponentialSolver):
    r"""Exact integrator for linear problems `y' = L y`: `y1 = exp(h L) y0`.

    **Order:** exact up to the Krylov tolerance; any step size is allowed (one step
    across the whole interval is fine).
    **Error estimator:** none (not adaptive); the accuracy is set by `krylov`.
    **Term structure:** `krylovexp.LinearTerm(L)`.
    **Cost per step:** one `expmv` (one adaptive Krylov sweep, also giving the dense
    output nodes).

    **Arguments:**

    - `krylov`: a [`krylovexp.KrylovExpm`][] configuration for the matrix exponential.
        Default: `KrylovExpm(rtol=0.01 * rtol, atol=0.01 * atol)` from the fields below,
        or the core's dtype defaults (relative 1e-8 in float64, 1e-5 in float32).
    - `rtol`, `atol`: target tolerances (as you would give a step-size controller); used
        only to build the default `krylov`.

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


class ETDRK2(AbstractExponentialSolver):
    r"""Second-order exponential Runge–Kutta method ETD2RK of Cox & Matthews for
    `y' = L y + N(t, y, args)`:

    `a = exp(hL) y0 + h phi_1(hL) N(t0, y0)`,
    `y1 = a + h phi_2(hL) (N(t0 + h, a) - N(t0, y0))`.

    **Order:** 2 (stiff order 2).
    **Error estimator:** none; use fixed steps.
    **Term structure:** `MultiTerm(LinearTerm(L), ODETerm(N))`.
    **Cost per step:** two N evaluations, two `phimv` sweeps.

    **Arguments:** as [`krylovexp.LinearExponential`][].

    **Reference:** S. M. Cox and P. C. Matthews, "Exponential time differencing for
    stiff systems", J. Comput. Phys. 176 (2002), eq. (22).
    """

    krylov: KrylovExpm | None = None
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)

    _kinds: ClassVar[tuple[str, ...]] = ("semilinear",)
    _phi_sweeps: ClassVar[tuple[tuple[float, ...], ...] | None] = (_NODES + (1.0,),) * 2
    _phi_order: ClassVar[int] = 2

    def order(self, terms) -> int | None:
        return 2

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        operator = problem.linear.make_operator(args)
        nonlinear = problem.nonlinear
        n0 = _vf(nonlinear, t0, y0, args)
        hinv = _safe_inverse(h)
        times = self._times(h)

        # Sweep 0: a = exp(hL) y0 + h phi_1 N0 (b_2 = 0).
        # Sweep 1: y1 = a + h phi_2 (N(t1, a) - N0), i.e. b_2 = (N(t1, a) - N0) / h.
        def vectors(i, aux):
            b2, _ = aux
            return (y0, n0, b2)

        def update(i, values, aux):
            b2, _ = aux

            def slope():
                na = _vf(nonlinear, t1, _at(values, -1), args)
                return _lin((hinv, na), (-hinv, n0))

            return lax.cond(i == 0, slope, lambda: b2), values

        aux = (_zeros_like(y0), _repeat(y0, len(_NODES) + 1))
        _, values = tracker.sweeps(
            self._krylov(), operator, 2, vectors, lambda i: times, update, aux
        )
        y1, ym = _split_dense(values)
        return y1, None, ym


class ETDRK4(AbstractExponentialSolver):
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

    _kinds: ClassVar[tuple[str, ...]] = ("semilinear",)
    _phi_sweeps: ClassVar[tuple[tuple[float, ...], ...] | None] = tuple(
        tuple(c * s for s in _NODES + (1.0,)) for c in (0.5, 0.5, 1.0, 1.0)
    )
    _phi_order: ClassVar[int] = 3

    def order(self, terms) -> int | None:
        return 4

    def _step(self, problem, t0, t1, h, y0, args, tracker):
        operator = problem.linear.make_operator(args)
        nonlinear = problem.nonlinear
        hinv = _safe_inverse(h)
        dtype = h.dtype
        # Sweep i computes U_{i+2} (i = 0, 1, 2) and then y1 (i = 3) as
        # phimv(L, (y0, G_1, b_2, b_3), tau_i) with b_2 = sum_k B2[i, k] G_k / h and
        # b_3 = sum_k B3[i, k] G_k / h².
        tau = jnp.asarray((0.5, 0.5, 1.0, 1.0), dtype=dtype)
        c_next = jnp.asarray((0.5, 0.5, 1.0, 1.0), dtype=dtype)
        b2_table = jnp.asarray(
            ((0, 0, 0, 0), (-4, 4, 0, 0), (-2, 0, 2, 0), (-3, 2, 2, -1)), dtype=dtype
        )
        b3_table = jnp.asarray(
            ((0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0), (4, -4, -4, 4)), dtype=dtype
        )
        nodes = jnp.asarray(_NODES + (1.0,), dtype=dtype)
        g1 = _vf(nonlinear, t0, y0, args)

        def vectors(i, aux):
            gs, _ = aux
            b2 = _combine(b2_table[i] * hinv, gs)
            b3 = _combine(b3_table[i] * hinv * hinv, gs)
            return (y0, g1, b2, b3)

        def update(i, values, aux):
            gs, _ = aux

            def stage():
                t = t0 + c_next[i] * (t1 - t0)
                g = _vf(nonlinear, t, _at(values, -1), args)
                return jtu.tree_map(lambda a, b: a.at[i + 1].set(b), gs, g)

            return lax.cond(i < 3, stage, lambda: gs), values

        gs = jtu.tree_map(lambda g: jnp.zeros((4,) + g.shape, g.dtype).at[0].set(g), g1)
        aux = (gs, _repeat(y0, len(_NODES) + 1))
        _, values = tracker.sweeps(
            self._krylov(),
            operator,
            4,
            vectors,
            lambda i: tau[i] * h * nodes,
            update,
            aux,
        )
        y1, ym = _split_dense(values)
        return y1, None, ym


# ---------------------------------------------------------------------------------
# Exponential Rosenbrock.


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
        values = jtu.tree_map(lambda y, d: y[None] + d, y0, increments)
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
        # Output times h/3, h/2, 2h/3, h (index 1: U_2; index 3: the step).
        times = h * jnp.asarray((_NODES[0], 0.5, _NODES[1], 1.0), dtype=h.dtype)
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
            lambda i: times,
            update,
            (zero, zero, outs),
        )
        tracker.count(2)  # J (U_i - y0) in the two remainders
        # y(θh) - y0 = A + C + E at θ = 1/3, 2/3, 1 (time indices 0, 2, 3).
        increments = jtu.tree_map(
            lambda o: (o[0] + o[2] + o[3])[np.array([0, 2, 3])], outs
        )
        y_error = jtu.tree_map(lambda o: o[3, -1], outs)
        values = jtu.tree_map(lambda y, d: y[None] + d, y0, increments)
        y1, ym = _split_dense(values)
        return y1, y_error, ym
