"""The base class of the exponential integrators as Diffrax solvers, the tracker of
the Krylov evaluations of one step, and the small pytree arithmetic their steps use.

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
import numpy as np
from jaxtyping import Array, Bool, PyTree

from ._dense_output import _NODES, ExponentialInterpolation
from ._diagonal import (
    PhiTable,
    is_diagonal_operator,
    make_table,
    table_phimv,
)
from ._expm import KrylovExpm
from ._problem import _classify, _Problem, _vf
from ._solution import RESULTS as KRYLOV_RESULTS


# Krylov tolerances derived from the solver's `rtol`/`atol`: a tenth of the local
# error that a step-size controller with those tolerances accepts. (A hundredth cost
# 11-26% more matvecs on KS 512, Allen-Cahn 128² and the example's Allen-Cahn 48²,
# and changed no error in their first three digits; see benchmarks/README.md.)
_KRYLOV_SAFETY = 0.1


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
        krylov = KrylovExpm() if self.krylov is None else self.krylov
        # The solver's tolerances fill in the Krylov tolerances `krylov` leaves unset,
        # so `krylov=KrylovExpm(method="lanczos")` keeps the controller's accuracy.
        if krylov.rtol is None and self.rtol is not None:
            krylov = dataclasses.replace(krylov, rtol=_KRYLOV_SAFETY * self.rtol)
        if krylov.atol is None and self.atol is not None:
            krylov = dataclasses.replace(krylov, atol=_KRYLOV_SAFETY * self.atol)
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


def _plus_each_row(y0, rows):
    """`y0 + rows[i]` for every row `i` (a static handful). Written as one sum per row
    rather than as the broadcast `y0[None] + rows`: the transpose of that broadcast is
    a reduction over the leading axis, which XLA:CPU (jax 0.10, YNNPACK fusions) runs
    10-40× slower than the same number of vector additions."""
    return jtu.tree_map(
        lambda y, d: jnp.stack([y + d[i] for i in range(d.shape[0])]), y0, rows
    )


def _split_dense(values):
    """Values at (1/3, 2/3, 1) -> (value at 1, stacked interior values)."""
    return _at(values, -1), _stack_nodes(values, [0, 1])
