"""Adaptive Krylov evaluation of `exp(tA) v` and of phi-function combinations, with
the substepping loop and its custom adjoint."""

from typing import Any, ClassVar, Literal, NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, PyTree, Real

from . import _arnoldi as arnoldi
from ._diagonal import diagonal_phimv, is_diagonal_operator
from ._operator import (
    FlatSystem,
    as_operator,
    check_vector,
    flatten,
    lanczos_applicable,
    operator_dtype,
    operator_size,
)
from ._projected import (
    approximation,
    checked_coefficients,
    coefficient_mask,
    combine,
    error_estimate,
    exp_coefficients,
    exp_gram,
    extended_hessenberg,
)
from ._solution import RESULTS, Solution


_DEFAULT_MAX_DIM = {"arnoldi": 64, "lanczos": 100}
_MAX_REJECTIONS = 40
# Bases up to this size grow in one buffer; larger ones in chunks of growing size.
_ONE_BUFFER_BYTES = 2**20


class AbstractKrylovAdjoint(eqx.Module):
    """How reverse-mode (and forward-mode) derivatives are computed."""


class KrylovAdjoint(AbstractKrylovAdjoint):
    """Reverse mode without differentiating through the loops: only substep
    boundaries are stored (start vectors in a fixed number of checkpoints), each
    substep's Krylov basis is rebuilt on the backward pass, peak memory is
    O(n (max_krylov_dim + 16 + max_substeps / 16)), and the step sizes chosen by the
    controller are constants. Reverse mode only: for `jax.jvp`/`jax.jacfwd` use
    [`krylovexp.DirectAdjoint`][].

    **Arguments:**

    - `mode`: what the gradient is the gradient of.
        - `"solution"` (default): of the exact `exp(τA(θ)) v`, to the tolerance. Per
          substep, the vector cotangent is `exp(τAᵀ) w̄`, by an adaptive Krylov
          evaluation with the transposed matvec, and the parameter cotangent is
          `∫_0^τ ∂θ⟨exp((τ-s)Aᵀ) w̄, A(θ) exp(sA) v⟩ ds`, integrated exactly in the
          product of the two Krylov spaces (a block exponential, Van Loan 1978) and
          paid with VJPs of the matvec over the forward basis.
        - `"approximation"`: of the computed Krylov approximation, exactly (to
          round-off), by the adjoint of the Arnoldi/Lanczos iteration (Krämer,
          Moreno-Muñoz, Roy & Hauberg, NeurIPS 2024): the steps are swept in reverse,
          one VJP of the matvec each. For stiff operators this derivative can be
          wrong by orders of magnitude even when the value meets its tolerance: the
          Krylov polynomial is accurate on the directions `v` excites, but a
          parameter or start-vector perturbation excites rough directions on which
          it does not damp as `exp(τA)` does.
    """

    mode: Literal["solution", "approximation"] = eqx.field(
        default="solution", static=True
    )

    def __check_init__(self):
        if self.mode not in ("solution", "approximation"):
            raise ValueError(
                f"`mode` must be 'solution' or 'approximation', got {self.mode!r}."
            )


class DirectAdjoint(AbstractKrylovAdjoint):
    """Differentiate through the Krylov loops with JAX's own autodiff (bounded while
    loops). Supports forward mode (`jax.jvp`, `jax.jacfwd`) as well as reverse mode,
    at the price of memory that grows with the number of Krylov steps and substeps.
    """


Method = Literal["auto", "arnoldi", "lanczos"]


class _Config(NamedTuple):
    max_dim: int
    min_dim: int
    max_substeps: int
    rtol: float
    atol: float
    orth: arnoldi.Orthogonalisation
    direct: bool
    corrected: bool
    solution_adjoint: bool
    throw: bool = False


class KrylovExpm(eqx.Module):
    """Adaptive Krylov evaluation of `exp(tA) v` and `sum_j t^j phi_j(tA) b_j`.

    The interval `[0, t]` is split into substeps; on each one a Krylov space of the
    operator is grown until the a-posteriori error estimate (Saad 1992) meets the
    tolerance per unit time, or, once `max_krylov_dim` is reached, the substep is
    shortened with the same basis (no new matvecs) until it does (Sidje 1998; Niesen &
    Wright 2012; Gaudreault, Rainwater & Tokman 2018).

    **Arguments:**

    - `method`: `"auto"` (Lanczos for operators Lineax knows to be symmetric/Hermitian,
        Arnoldi otherwise), `"arnoldi"` (full orthogonalisation) or `"lanczos"`
        (three-term recurrence; for phi-functions, incomplete orthogonalisation of the
        augmented operator).
    - `rtol`, `atol`: each substep's error estimate must be below `atol + rtol * |w|`
        (`w` its start vector) times its share of the interval, so the 2-norm error is
        about `atol + rtol * max(|v|, |exp(tA) v|)` for normal and dissipative
        operators; `stats["growth_factor"]` bounds the amplification for non-normal
        ones. Default `rtol` 1e-8 in double and 1e-5 in single precision, `atol` 0.
    - `max_krylov_dim`: largest Krylov dimension per substep (default 64 for Arnoldi,
        100 for Lanczos, never more than the operator size).
    - `min_krylov_dim`: smallest dimension at which the error estimate is trusted.
    - `max_substeps`: substep budget.
    - `adjoint`: [`krylovexp.KrylovAdjoint`][] (default) or
        [`krylovexp.DirectAdjoint`][].
    - `throw`: raise a runtime error on failure (else only report `Solution.result`).
    - `corrected`: return the corrected approximation `beta Q_{k+1} exp(tau H_ext) e_1`,
        which uses the next basis vector at no extra cost (Saad 1992) and is more
        accurate than the error estimate says; `False` gives the plain Galerkin
        approximation `beta Q_k exp(tau H_k) e_1` (as matfree and the paper use).

    Calling the module, `KrylovExpm(...)(operator, vector, t)`, returns `exp(tA) v`;
    [`krylovexp.KrylovExpm.expmv`][] and [`krylovexp.KrylovExpm.phimv`][] return a
    [`krylovexp.Solution`][] with statistics.
    """

    method: Method = eqx.field(default="auto", static=True)
    rtol: float | None = eqx.field(default=None, static=True)
    atol: float | None = eqx.field(default=None, static=True)
    max_krylov_dim: int | None = eqx.field(default=None, static=True)
    min_krylov_dim: int = eqx.field(default=1, static=True)
    max_substeps: int = eqx.field(default=256, static=True)
    adjoint: AbstractKrylovAdjoint = KrylovAdjoint()
    throw: bool = eqx.field(default=True, static=True)
    corrected: bool = eqx.field(default=True, static=True)

    _methods: ClassVar[tuple[str, ...]] = ("auto", "arnoldi", "lanczos")

    def __check_init__(self):
        if self.method not in self._methods:
            raise ValueError(
                f"`method` must be one of {self._methods}, got {self.method!r}."
            )
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("`rtol` and `atol` cannot both be zero.")
        if self.max_krylov_dim is not None and self.max_krylov_dim < 1:
            raise ValueError(
                f"`max_krylov_dim` must be at least 1, got {self.max_krylov_dim}."
            )
        if self.min_krylov_dim < 1:
            raise ValueError(
                f"`min_krylov_dim` must be at least 1, got {self.min_krylov_dim}."
            )
        if self.max_substeps < 1:
            raise ValueError(
                f"`max_substeps` must be at least 1, got {self.max_substeps}."
            )
        if not isinstance(self.adjoint, AbstractKrylovAdjoint):
            raise ValueError(
                "`adjoint` must be krylovexp.KrylovAdjoint() or "
                "krylovexp.DirectAdjoint()."
            )

    def __call__(
        self,
        operator: lx.AbstractLinearOperator | ArrayLike,
        vector: PyTree[ArrayLike],
        t: Real[ArrayLike, ""] | Real[ArrayLike, " times"] = 1.0,
    ) -> PyTree[Array]:
        """`exp(tA) v`; see [`krylovexp.KrylovExpm.expmv`][]."""
        return self.expmv(operator, vector, t).value

    def expmv(
        self,
        operator: lx.AbstractLinearOperator | ArrayLike,
        vector: PyTree[ArrayLike],
        t: Real[ArrayLike, ""] | Real[ArrayLike, " times"] = 1.0,
    ) -> Solution:
        """Evaluate `exp(tA) v`.

        **Arguments:**

        - `operator`: a square `lineax.AbstractLinearOperator`, or a square 2-D array.
        - `vector`: a pytree matching the operator's input structure and dtype.
        - `t`: a real scalar (positive, zero or negative), or a 1-D array of monotone
            output times starting from 0, evaluated in one adaptive sweep.

        **Returns:**

        A [`krylovexp.Solution`][]; `value` has the structure of `vector`, with a
        leading axis of length `len(t)` if `t` is 1-D.
        """
        op = as_operator(operator)
        check_vector(op, vector, "vector")
        if is_diagonal_operator(op):
            return diagonal_phimv(self, op, (vector,), t)
        flat_vector, unravel = ravel_pytree(vector)
        params, system = flatten(op)
        return self._run(params, system, op, flat_vector, unravel, t, augmented=0)

    def phimv(
        self,
        operator: lx.AbstractLinearOperator | ArrayLike,
        vectors: tuple[PyTree[ArrayLike], ...],
        t: Real[ArrayLike, ""] | Real[ArrayLike, " times"] = 1.0,
    ) -> Solution:
        """Evaluate `sum_{j=0}^{p} t^j phi_j(tA) b_j` for `vectors = (b_0, ..., b_p)`.

        `phi_0 = exp` and `phi_{j+1}(z) = (phi_j(z) - 1/j!) / z`. The sum is the top
        block of `exp(t Ã) [b_0; e_p]` with `Ã = [[A, W], [0, J]]`, `W = [b_p, ...,
        b_1]` and `J` the p×p shift matrix (Al-Mohy & Higham 2011, Theorem 2.1), so a
        single adaptive Krylov sweep of the augmented operator gives all terms.

        **Arguments:** as [`krylovexp.KrylovExpm.expmv`][], with `vectors` a non-empty
        tuple of pytrees matching the operator's input structure.

        **Returns:** a [`krylovexp.Solution`][].
        """
        if not isinstance(vectors, (tuple, list)) or len(vectors) == 0:
            raise ValueError(
                "`vectors` must be a non-empty tuple (b_0, ..., b_p) of pytrees "
                "matching the operator's input structure."
            )
        op = as_operator(operator)
        for j, b in enumerate(vectors):
            check_vector(op, b, f"vectors[{j}]")
        if is_diagonal_operator(op):
            return diagonal_phimv(self, op, tuple(vectors), t)
        if len(vectors) == 1:
            return self.expmv(op, vectors[0], t)
        p = len(vectors) - 1
        flats = [ravel_pytree(b)[0] for b in vectors]
        _, unravel = ravel_pytree(vectors[0])
        base_params, base = flatten(op)
        coupling = jnp.stack(flats[:0:-1])  # W^T: rows b_p, ..., b_1
        scales = _tail_scales(jnp.linalg.norm(coupling, axis=1)[::-1], t)[::-1]
        coupling = coupling / scales[:, None].astype(coupling.dtype)
        dtype = flats[0].dtype
        tail = jnp.zeros(p, dtype).at[-1].set(scales[-1].astype(dtype))
        start = jnp.concatenate([flats[0], tail])
        ratios = (scales[:-1] / scales[1:]).astype(coupling.dtype)
        params = (base_params, coupling, ratios)
        return self._run(params, _AugmentedSystem(base), op, start, unravel, t, p)

    def _run(self, params, system, op, flat_vector, unravel, t, augmented):
        dtype = operator_dtype(op)
        real_dtype = jnp.finfo(dtype).dtype
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.complexfloating):
            raise ValueError(
                "`t` must be real; for exp(i t H) pass the operator `1j * H` instead."
            )
        if t.ndim > 1:
            raise ValueError(
                f"`t` must be a scalar or a 1-D array, got shape {t.shape}."
            )
        if t.ndim == 1 and t.shape[0] == 0:
            raise ValueError("`t` must not be an empty array.")
        times = jnp.atleast_1d(t).astype(real_dtype)
        size = operator_size(op) + augmented
        config = self._config(op, size, augmented, real_dtype)
        try:
            outputs, result, stats = _evaluate(
                (params, flat_vector, times), system, config
            )
        except TypeError as e:
            if "forward-mode" in str(e) or "jvp" in str(e):
                raise TypeError(
                    "Forward-mode autodiff (jax.jvp, jax.jacfwd, diffrax.ForwardMode) "
                    "is not available with the default custom adjoint "
                    "krylovexp.KrylovAdjoint(). Pass "
                    "`adjoint=krylovexp.DirectAdjoint()` to differentiate through the "
                    "Krylov loops instead."
                ) from e
            raise
        # The result code and statistics carry no derivative information.
        result, stats = lax.stop_gradient((result, stats))
        n = flat_vector.shape[0] - augmented
        outputs = outputs[:, :n]
        if self.throw:
            outputs = result.error_if(outputs, result != RESULTS.successful)
        value = jax.vmap(unravel)(outputs)
        if t.ndim == 0:
            value = jtu.tree_map(lambda x: x[0], value)
        return Solution(value=value, result=result, stats=stats)

    def _config(self, op, size, augmented, real_dtype) -> _Config:
        method = self.method
        if method == "auto":
            lanczos = augmented == 0 and lanczos_applicable(op)
            method = "lanczos" if lanczos else "arnoldi"
        if self.max_krylov_dim is None:
            max_dim = min(_DEFAULT_MAX_DIM[method], size)
        else:
            max_dim = self.max_krylov_dim
            if max_dim > size:
                raise ValueError(
                    f"`max_krylov_dim` = {max_dim} exceeds the operator size {size}"
                    + (f" (including {augmented} augmented rows)" if augmented else "")
                    + "; a Krylov space cannot be larger than the space it lives in."
                )
        min_dim = min(self.min_krylov_dim, max_dim)
        if method == "lanczos":
            orth = arnoldi.Orthogonalisation(
                window=2, head=augmented + 1 if augmented else 0
            )
        else:
            orth = arnoldi.FULL
        double = real_dtype == jnp.float64
        rtol = self.rtol if self.rtol is not None else (1e-8 if double else 1e-5)
        atol = self.atol if self.atol is not None else 0.0
        return _Config(
            max_dim=max_dim,
            min_dim=min_dim,
            max_substeps=self.max_substeps,
            rtol=float(rtol),
            atol=float(atol),
            orth=orth,
            direct=isinstance(self.adjoint, DirectAdjoint),
            solution_adjoint=isinstance(self.adjoint, KrylovAdjoint)
            and self.adjoint.mode == "solution",
            corrected=self.corrected,
            throw=self.throw,
        )


def _tail_scales(norms, t):
    """The diagonal `D = diag(d_1, ..., d_p)` of the similarity `diag(I, D)` applied
    to the augmented operator of `phimv` (`norms[j - 1] = ||b_j||`, `d_j` the scale
    of the tail entry that carries `s^(j-1) / (j-1)!`, the coefficient of `b_j`).

    The substep tolerance is relative to the norm of the whole augmented vector. With
    the tail at a common scale `eta = max_j ||b_j||` every term only gets the absolute
    accuracy `rtol eta`: a term much smaller than that (one `phi_j` at a small `t`, or
    KIOPS-style inputs `b_j / t^j`) loses its relative accuracy (relative error 1.7e-3
    for `t^3 phi_3(tA) b` alone at `t = 1e-3`, rtol 1e-8). Here each tail entry is
    scaled so that at `T = max |t|` it has the size of the largest term it drives:
    `d_j T^(j-1) / (j-1)! = max_{k >= j} ||b_k|| T^k / k!`. The augmented norm is
    then about the size of the result and its terms. Entries that drive no nonzero
    term continue the scale of the last one that does. No gradient flows through
    it (the top block does not depend on `D`).
    """
    span = jnp.max(jnp.abs(jnp.asarray(t))).astype(norms.dtype)
    log_span = jnp.log(jnp.where(span > 0, span, 1))
    order = jnp.arange(1, norms.shape[0] + 1, dtype=norms.dtype)
    log_factorial = lax.lgamma(order + 1)  # log j!
    largest = jnp.max(norms)
    log_norms = jnp.log(jnp.where(norms > 0, norms, 1))
    # log of ||b_j|| T^j / j!; a zero b_j gets the size it would have at the largest
    # norm, so that a chain of entries above the last nonzero term stays balanced.
    log_size = order * log_span - log_factorial
    log_term = jnp.where(norms > 0, log_norms, -jnp.inf) + log_size
    fallback = jnp.log(jnp.where(largest > 0, largest, 1)) + log_size
    log_drive = lax.cummax(log_term, axis=0, reverse=True)
    log_drive = jnp.where(jnp.isfinite(log_drive), log_drive, fallback)
    log_scale = log_drive + log_factorial - jnp.log(order) - (order - 1) * log_span
    return lax.stop_gradient(jnp.exp(log_scale))


class _AugmentedSystem(eqx.Module):
    """The augmented operator `[[A, W D^-1], [0, D J D^-1]]` of the phi-function
    identity, with the tail scaling `D` of `_tail_scales`."""

    base: FlatSystem

    def matvec(self, params, x):
        # coupling rows: b_p / d_p, ..., b_1 / d_1; ratios: d_j / d_(j-1), j = p..2.
        base_params, coupling, ratios = params
        p = coupling.shape[0]
        n = x.shape[0] - p
        head, tail = x[:n], x[n:]
        top = self.base.matvec(base_params, head) + tail @ coupling
        shifted = jnp.concatenate([ratios * tail[1:], jnp.zeros(1, tail.dtype)])
        return jnp.concatenate([top, shifted])


# ---------------------------------------------------------------------------------
# The substepping loop.


def _while(cond, body, init, max_steps, direct):
    if direct:
        return eqxi.while_loop(cond, body, init, max_steps=max_steps, kind="bounded")
    return lax.while_loop(cond, body, init)


class _Substep(NamedTuple):
    value: Array  # the approximation at the end of the substep
    hessenberg: Array  # (max_dim + 1, max_dim)
    beta: Array
    dim: Array
    tau: Array  # signed step taken (differentiable through the end time)
    ends: Array  # whether it reaches the segment's end time
    accepted: Array
    rejections: Array
    next_try: Array  # suggested magnitude of the next step
    estimate: Array
    propagator_norm: Array  # ||exp(tau H_k)||_2, see `checked_coefficients`
    basis: Any  # the basis buffer, when the substep grew in a given buffer
    extra: Any  # what the `finish` hook returned, or None


class _Growth(NamedTuple):
    """The state of a growing Krylov space between error checks."""

    dim: Array
    met: Array  # the estimate meets the tolerance (at a trusted dimension)
    broken: Array  # the space is invariant: no further vector
    coeffs: Array  # first column of exp(tau H_ext) at the last check
    err: Array
    norm: Array  # ||exp(tau H_k)||_2 at the last check
    next_check: Array
    last_dim: Array
    last_log_ratio: Array


def _next_check(dim, log_ratio, last_dim, last_log_ratio, max_dim):
    """Where to evaluate the error estimate next while the basis grows.

    The log error ratio is extrapolated linearly from the last two checks; convergence
    is superlinear, so this overestimates the dimension needed and we go 80% of the
    way. Without a usable trend (no earlier check, or no decrease yet), the dimension
    grows geometrically by 1.25. Either way at most by 1.5×: few small exponentials,
    and never many more basis vectors than needed.
    """
    geometric = jnp.maximum(dim + 1, jnp.round(1.25 * dim).astype(dim.dtype))
    rate = (last_log_ratio - log_ratio) / jnp.maximum(dim - last_dim, 1)
    usable = (last_dim > 0) & (rate > 0) & jnp.isfinite(rate) & jnp.isfinite(log_ratio)
    ahead = jnp.ceil(0.8 * log_ratio / jnp.where(usable, rate, 1.0))
    ahead = jnp.where(usable & jnp.isfinite(ahead), ahead, 0).astype(dim.dtype)
    longest = jnp.maximum(geometric, jnp.ceil(1.5 * dim).astype(dim.dtype))
    predicted = jnp.clip(dim + ahead, dim + 1, longest)
    return jnp.minimum(jnp.where(usable, predicted, geometric), max_dim)


def _substep(
    system,
    params,
    w,
    tau_try,
    remaining,
    tol_per_time,
    config: _Config,
    buffer=None,
    finish=None,
    min_capacity=None,
):
    """One adaptive substep from `w` (see `KrylovExpm`): grow the basis, then shrink
    the step on the same basis until the error estimate meets the tolerance.

    The basis grows through buffers of increasing capacity (`arnoldi.row_buckets`,
    8, 16, 32, ... rows), each entered only when the previous one is full and the
    estimate still fails, so allocation and every read follow the dimension reached.
    With `buffer`, the basis grows in that buffer instead (the recording sweep);
    error checks are placed at the same dimensions either way, so both make the same
    decisions. `finish(decomp, dim, tau, low, value)`, if given, runs on the final
    decomposition (its basis capacity is static; `low` bounds `dim + 1` from below;
    `value` is the approximation at `tau`) and its result is returned as `extra`.
    The substep does not finish in a buffer of fewer than `min_capacity` rows: it
    grows on (or, after a breakdown, moves up) to a large enough one.

    A substep shrinks its step only in the last buffer: in the others it stops growing
    only once the estimate is met (or the space is invariant, estimate 0).
    """
    m = config.max_dim
    capacities = arnoldi.row_buckets(m + 1)
    boundaries = jnp.asarray([c - 1 for c in capacities])
    if buffer is None and (m + 1) * w.size * w.dtype.itemsize <= _ONE_BUFFER_BYTES:
        # A small basis is cheapest in one buffer (one compiled loop).
        buffer = jnp.zeros((m + 1,) + w.shape, w.dtype)
        keep = False
    else:
        keep = buffer is not None
    sign = jnp.where(remaining < 0, -1.0, 1.0).astype(remaining.dtype)
    cap = lax.stop_gradient(jnp.abs(remaining))
    tau_abs = jnp.minimum(lax.stop_gradient(tau_try), cap)
    if buffer is None:
        decomp0 = arnoldi.start(w, m, rows=capacities[0])
    else:
        decomp0 = arnoldi.start(w, m, buffer=buffer)
    tol = lax.stop_gradient(tol_per_time(decomp0.beta))

    def coefficients(decomp, dim, tau_abs, low):
        decomp = lax.stop_gradient(decomp)
        coeffs, rounding, guard, norm = checked_coefficients(
            decomp.hessenberg, dim, sign * lax.stop_gradient(tau_abs), low
        )
        # Saad's estimate, plus the rounding error of the small exponential where its
        # squarings amplify it; and only what the estimate with the weak couplings
        # raised accepts too (see `checked_coefficients`).
        err = error_estimate(decomp, coeffs, dim) + decomp.beta * rounding
        return coeffs, jnp.maximum(err, decomp.beta * guard), norm

    def may_finish(limit):
        return jnp.asarray(True) if min_capacity is None else limit + 1 >= min_capacity

    def done(g: _Growth, limit):
        return (g.met | g.broken | (g.dim >= m)) & may_finish(limit)

    def grow(decomp, growth: _Growth, limit, low):
        """Steps and checks until done or until the dimension reaches `limit`."""

        def step_cond(state):
            _, j, breakdown, target = state
            return (j < target) & ~breakdown

        def step_body(state):
            decomp, j, _, target = state
            decomp, breakdown = arnoldi.step(
                system.matvec, params, decomp, j, config.orth, low
            )
            return decomp, j + 1, breakdown, target

        def cond(state):
            _, g = state
            return ~done(g, limit) & (g.dim < limit) & ~g.broken

        def body(state):
            decomp, g = state
            # Never check past the next capacity boundary (see the docstring).
            boundary = boundaries[jnp.searchsorted(boundaries, g.dim + 1)]
            target = jnp.minimum(jnp.minimum(g.next_check, boundary), limit)
            decomp, dim, breakdown, _ = _while(
                step_cond,
                step_body,
                (decomp, g.dim, jnp.asarray(False), target),
                limit,
                config.direct,
            )
            coeffs, err, norm = coefficients(decomp, dim, tau_abs, low)
            met = (err <= tau_abs * tol) & ((dim >= config.min_dim) | breakdown)
            log_ratio = jnp.log(err) - jnp.log(tau_abs * tol)
            next_check = _next_check(dim, log_ratio, g.last_dim, g.last_log_ratio, m)
            next_check = jnp.maximum(next_check, config.min_dim)
            g = _Growth(
                dim=dim,
                met=met,
                broken=breakdown,
                coeffs=coeffs,
                err=err,
                norm=norm,
                next_check=next_check,
                last_dim=dim,
                last_log_ratio=log_ratio,
            )
            return decomp, g

        return _while(cond, body, (decomp, growth), limit, config.direct)

    def shrink_and_finish(decomp, g: _Growth, low, last):
        dim = g.dim

        def shrink_cond(state):
            return ~state[3] & (state[4] < _MAX_REJECTIONS)

        def shrink_body(state):
            tau_abs, _, err, _, count, _ = state
            ratio = err / (tau_abs * tol)
            factor = jnp.clip(0.9 * ratio ** (-1.0 / dim), 0.1, 0.9)
            factor = jnp.where(jnp.isfinite(factor), factor, 0.1)
            tau_abs = tau_abs * factor
            coeffs, err, norm = coefficients(decomp, dim, tau_abs, low)
            return tau_abs, coeffs, err, err <= tau_abs * tol, count + 1, norm

        shrink_init = (tau_abs, g.coeffs, g.err, g.met, jnp.asarray(0), g.norm)
        if last:
            tau_shrunk, coeffs, err, accepted, rejections, norm = _while(
                shrink_cond, shrink_body, shrink_init, _MAX_REJECTIONS, config.direct
            )
        else:
            tau_shrunk, coeffs, err, accepted, rejections, norm = shrink_init
        ends = (rejections == 0) & (tau_shrunk >= cap)
        tau = jnp.where(ends, remaining, sign * tau_shrunk)
        if config.direct:
            # Differentiate through the end time: recompute with the traced step.
            value = approximation(decomp, dim, tau, config.orth, config.corrected, low)
        else:
            value = combine(decomp, coeffs, dim, config.orth, config.corrected, low)
        ratio = err / jnp.where(tau_shrunk * tol > 0, tau_shrunk * tol, 1)
        growth = jnp.where(ratio > 0, 0.9 * ratio ** (-1.0 / dim), 10.0)
        growth = jnp.clip(jnp.where(jnp.isfinite(growth), growth, 10.0), 1.0, 10.0)
        next_try = jnp.maximum(
            tau_shrunk * growth, jnp.where(rejections == 0, tau_try, 0)
        )
        return _Substep(
            value=value,
            hessenberg=decomp.hessenberg,
            beta=decomp.beta,
            dim=dim,
            tau=tau,
            ends=ends,
            accepted=accepted,
            rejections=rejections,
            next_try=next_try,
            estimate=err,
            propagator_norm=norm,
            basis=arnoldi.single(decomp) if keep else None,
            extra=None if finish is None else finish(decomp, dim, tau, low, value),
        )

    def level(i, decomp, g):
        if buffer is not None:
            return shrink_and_finish(*grow(decomp, g, m, 1), 1, True)
        low = 1 if i == 0 else capacities[i - 1] + 1
        decomp, g = grow(decomp, g, capacities[i] - 1, low)
        if i == len(capacities) - 1:
            return shrink_and_finish(decomp, g, low, True)
        return lax.cond(
            done(g, capacities[i] - 1),
            lambda decomp, g: shrink_and_finish(decomp, g, low, False),
            lambda decomp, g: level(
                i + 1,
                arnoldi.extend(decomp, capacities[i + 1] - capacities[i], config.orth),
                g,
            ),
            decomp,
            g,
        )

    growth0 = _Growth(
        dim=jnp.asarray(0),
        met=jnp.asarray(False),
        broken=jnp.asarray(False),
        coeffs=jnp.zeros(m + 1, w.dtype),
        err=jnp.asarray(jnp.inf, cap.dtype),
        norm=jnp.asarray(1.0, cap.dtype),
        next_check=jnp.asarray(config.min_dim),
        last_dim=jnp.asarray(0),
        last_log_ratio=jnp.asarray(jnp.inf, cap.dtype),
    )
    return level(0, decomp0, growth0)


# Substep starts kept for the backward pass; see `_store_checkpoint`.
_CHECKPOINT_SLOTS = 16


def _checkpoint_slots(config: _Config) -> int:
    return min(config.max_substeps, _CHECKPOINT_SLOTS)


def _max_stride(config: _Config) -> int:
    stride = 1
    while _checkpoint_slots(config) * stride < config.max_substeps:
        stride *= 2
    return stride


class _Record(NamedTuple):
    """What the forward sweep keeps for the backward pass: the start vectors of every
    `stride`-th substep, each substep's start time and step size, the outputs it
    covered (`first` to `last`, exclusive) and whether it ends at the final time, and
    the last substep's decomposition (its basis in `basis`, the buffer every recorded
    substep grows in)."""

    checkpoints: Array  # (slots, n)
    stride: Array
    starts: Array
    taus: Array
    first: Array
    last: Array
    ends: Array
    basis: Array  # (max_dim + 1, n)
    hessenberg: Array
    beta: Array


def _store_checkpoint(rec: _Record, index, start) -> _Record:
    """Keep the start of substep `index` if `index` is a multiple of the stride. When
    the slots are full, every other checkpoint is dropped and the stride doubles, so
    memory stays `slots × n` however many substeps are taken, and the backward pass
    recomputes at most `stride - 1` substeps per checkpoint (one extra forward sweep
    in all, and none while the substeps fit in the slots)."""
    slots = rec.checkpoints.shape[0]
    full = index == slots * rec.stride

    def thin(checkpoints):
        kept = checkpoints[::2]
        return jnp.concatenate([kept, jnp.zeros_like(checkpoints[kept.shape[0] :])])

    checkpoints = lax.cond(full, thin, lambda x: x, rec.checkpoints)
    stride = jnp.where(full, 2 * rec.stride, rec.stride)
    slot = jnp.minimum(index // stride, slots - 1)
    keep = index % stride == 0
    row = jnp.where(keep, start, checkpoints[slot])
    return rec._replace(checkpoints=checkpoints.at[slot].set(row), stride=stride)


class _Carry(NamedTuple):
    segment: Array
    time: Array
    w: Array
    tau_try: Array
    outputs: Array
    num_substeps: Array
    num_matvecs: Array
    num_rejected: Array
    dims: Array
    error: Array
    amplified: Array  # see `_growth_factor`
    worst: Array  # the largest `amplified` so far
    failed: Array
    record: Any  # a `_Record`, or None
    visited: Any  # accumulator of the `finish` hook's results, or None


def _loop(
    params,
    vector,
    times,
    system,
    config: _Config,
    record: bool,
    visit=None,
    acc=None,
    min_capacity=None,
):
    """The adaptive sweep over the output times (see `_sweep`). Under `vmap` it runs
    sequentially over the batch (`jax.custom_batching.sequential_vmap`): batching the
    adaptive loops themselves would turn every capacity level and every conditional
    error check into a select that runs all branches, about 100× slower. Not with
    `DirectAdjoint`, whose loops JAX must differentiate."""

    def run(params, vector, times, acc, min_capacity):
        return _sweep(
            params, vector, times, system, config, record, visit, acc, min_capacity
        )

    if not config.direct:
        run = jax.custom_batching.sequential_vmap(run)
    return run(params, vector, times, acc, min_capacity)


def _sweep(
    params, vector, times, system, config: _Config, record, visit, acc, min_capacity
):
    """`visit(time, decomp, dim, tau)`, if given, runs on every substep's final
    decomposition (`time`: the substep's start) and its results are summed into
    `acc`; substeps skip basis buffers of fewer than `min_capacity` rows."""
    num_times = times.shape[0]
    n = vector.shape[0]
    real = times.dtype
    span = jnp.max(jnp.abs(times))
    span = jnp.where(span > 0, span, 1)

    def tol_per_time(beta):
        return (config.atol + config.rtol * beta) / span

    deltas = jnp.diff(jnp.concatenate([jnp.zeros(1, real), times]))
    monotone = jnp.all(deltas >= 0) | jnp.all(deltas <= 0)
    finite = jnp.all(jnp.isfinite(vector)) & jnp.all(jnp.isfinite(times))
    for leaf in jtu.tree_leaves(params):
        finite = finite & jnp.all(jnp.isfinite(leaf))
    valid = monotone & finite

    if record:
        start = arnoldi.start(vector, config.max_dim)
        rec = _Record(
            checkpoints=jnp.zeros((_checkpoint_slots(config), n), vector.dtype),
            stride=jnp.asarray(1),
            starts=jnp.zeros(config.max_substeps, real),
            taus=jnp.zeros(config.max_substeps, real),
            first=jnp.zeros(config.max_substeps, jnp.int32),
            last=jnp.zeros(config.max_substeps, jnp.int32),
            ends=jnp.zeros(config.max_substeps, bool),
            basis=arnoldi.single(start),
            hessenberg=start.hessenberg,
            beta=start.beta,
        )
    else:
        rec = None

    init = _Carry(
        segment=jnp.where(valid, 0, num_times),
        time=jnp.zeros((), real),
        w=vector,
        tau_try=jnp.abs(times[0]) if num_times else jnp.zeros((), real),
        outputs=jnp.full((num_times, n), jnp.nan, vector.dtype),
        num_substeps=jnp.asarray(0),
        num_matvecs=jnp.asarray(0),
        num_rejected=jnp.asarray(0),
        dims=jnp.zeros(config.max_substeps, jnp.int32),
        error=jnp.zeros((), real),
        amplified=jnp.zeros((), real),
        worst=jnp.zeros((), real),
        failed=jnp.asarray(False),
        record=rec,
        visited=acc,
    )
    init = init._replace(tau_try=jnp.where(init.tau_try > 0, init.tau_try, span))

    def cond(c: _Carry):
        # A non-finite state (NaN from the operator, overflow) cannot recover: stop.
        going = (c.segment < num_times) & (c.num_substeps < config.max_substeps)
        return going & jnp.all(jnp.isfinite(c.w))

    def body(c: _Carry):
        # A substep aims at the final time; every output time it passes is evaluated
        # from its basis (a small exponential and a combination each, with its own
        # error estimate), so a time grid costs no extra Krylov spaces.
        target = times[num_times - 1]
        remaining = target - c.time

        def finish(decomp, dim, tau, low, value):
            ends = tau == remaining

            def covered(state):
                segment, _, _ = state
                inside = jnp.abs(times[segment] - c.time) <= jnp.abs(tau)
                end_point = ends & (segment == num_times - 1)
                return (segment < num_times) & inside & ~end_point

            def evaluate(state):
                segment, outputs, ok = state
                sigma = times[segment] - c.time
                coeffs = exp_coefficients(decomp.hessenberg, dim, sigma, low)
                estimate = error_estimate(decomp, coeffs, dim)
                tol = tol_per_time(decomp.beta) * jnp.abs(sigma)
                out = combine(decomp, coeffs, dim, config.orth, config.corrected, low)
                ok = ok & (lax.stop_gradient(estimate) <= tol)
                return segment + 1, outputs.at[segment].set(out), ok

            segment, outputs, ok = _while(
                covered,
                evaluate,
                (c.segment, c.outputs, jnp.asarray(True)),
                num_times,
                config.direct,
            )
            outputs = jnp.where(ends, outputs.at[num_times - 1].set(value), outputs)
            segment = jnp.where(ends, num_times, segment)
            visited = None if visit is None else visit(c.time, decomp, dim, tau)
            return segment, outputs, ok, visited

        sub = _substep(
            system,
            params,
            c.w,
            c.tau_try,
            remaining,
            tol_per_time,
            config,
            buffer=None if c.record is None else c.record.basis,
            finish=finish,
            min_capacity=min_capacity,
        )
        segment, outputs, interior_ok, increment = sub.extra
        if record:
            index = c.num_substeps
            r = _store_checkpoint(c.record, index, c.w)
            rec = r._replace(
                starts=r.starts.at[index].set(lax.stop_gradient(c.time)),
                taus=r.taus.at[index].set(lax.stop_gradient(sub.tau)),
                first=r.first.at[index].set(c.segment),
                last=r.last.at[index].set(segment),
                ends=r.ends.at[index].set(sub.ends),
                basis=sub.basis,
                hessenberg=sub.hessenberg,
                beta=sub.beta,
            )
        else:
            rec = None
        visited = c.visited
        if visit is not None:
            visited = jtu.tree_map(jnp.add, c.visited, increment)
        # The earlier substeps' tolerances, carried through this substep by the norm
        # of its projected propagator, and this one's (see `_growth_factor`).
        amplified = lax.stop_gradient(
            jnp.maximum(
                c.amplified * sub.propagator_norm, span * tol_per_time(sub.beta)
            )
        )
        return _Carry(
            segment=segment,
            time=jnp.where(sub.ends, target, c.time + sub.tau),
            w=sub.value,
            tau_try=sub.next_try,
            outputs=outputs,
            num_substeps=c.num_substeps + 1,
            num_matvecs=c.num_matvecs + sub.dim,
            num_rejected=c.num_rejected + sub.rejections,
            dims=c.dims.at[c.num_substeps].set(sub.dim),
            error=c.error + sub.estimate,
            amplified=amplified,
            worst=jnp.maximum(c.worst, amplified),
            failed=c.failed | ~sub.accepted | ~interior_ok,
            record=rec,
            visited=visited,
        )

    final = _while(cond, body, init, config.max_substeps, config.direct)
    growth = _growth_factor(final, vector, config)
    # In order of precedence: the first that applies is reported.
    outcomes = (
        (~finite, RESULTS.nonfinite_input),
        (~monotone, RESULTS.nonmonotone_times),
        (~jnp.all(jnp.isfinite(final.w)), RESULTS.nonfinite_output),
        (final.segment < num_times, RESULTS.max_substeps_reached),
        (final.failed, RESULTS.tolerance_not_met),
        (~jnp.all(jnp.isfinite(final.outputs)), RESULTS.nonfinite_output),
        # No significant digit can be vouched for once growth * rtol >= 1.
        (growth * config.rtol >= 1, RESULTS.error_amplified),
    )
    result = RESULTS.successful
    for condition, code in reversed(outcomes):
        result = RESULTS.where(condition, code, result)
    stats = {
        "num_matvecs": final.num_matvecs,
        "num_substeps": final.num_substeps,
        "num_rejected": final.num_rejected,
        "max_krylov_dim": jnp.max(final.dims),
        "krylov_dims": final.dims,
        "error_estimate": final.error,
        "growth_factor": growth,
    }
    return final, result, stats


def _growth_factor(final: _Carry, vector, config: _Config):
    """How far the local errors may be amplified beyond the tolerance.

    Substep `j` is accepted when its local error is below `tol_j = atol + rtol
    beta_j` (times its share of the interval), `beta_j` the norm of its start vector.
    An error committed in substep `j` reaches the end multiplied by the propagators of
    the later substeps, whose norms are estimated by those of the projected ones,
    `g_l = ||exp(tau_l H_l)||_2`. The carry holds `max_j tol_j prod_{l > j} g_l` and
    its largest value over the sweep (which covers every output time); the factor is
    the latter over `atol + rtol max(|v|, |value|)`, at least 1. It is 1 for a single
    substep and about 1 when the operator amplifies errors no more than it grows the
    solution (normal and dissipative operators), and large for strongly non-normal
    ones (Pascal- or Jordan-type transient growth), where the achieved error can
    exceed the tolerance by up to this factor although every local estimate met it.
    A product of norms bounds the norm of the product, so the factor errs on the
    pessimistic side."""
    norms = jnp.linalg.norm(final.outputs, axis=1)
    norms = jnp.where(jnp.isfinite(norms), norms, 0)
    largest = jnp.maximum(jnp.linalg.norm(vector), jnp.max(norms))
    scale = config.atol + config.rtol * largest
    factor = final.worst / jnp.where(scale > 0, scale, 1)
    return jnp.maximum(jnp.where(jnp.isnan(factor), jnp.inf, factor), 1.0)


@eqx.filter_custom_vjp
def _evaluate_custom(primals, system, config):
    params, vector, times = primals
    final, result, stats = _loop(params, vector, times, system, config, record=False)
    return final.outputs, result, stats


@_evaluate_custom.def_fwd
def _evaluate_fwd(perturbed, primals, system, config):
    del perturbed
    params, vector, times = primals
    final, result, stats = _loop(params, vector, times, system, config, record=True)
    residuals = (final.record, final.dims, final.num_substeps)
    return (final.outputs, result, stats), residuals


@_evaluate_custom.def_bwd
def _evaluate_bwd(residuals, grad_obj, perturbed, primals, system, config):
    params, vector, times = primals
    outputs_bar = grad_obj[0]
    if outputs_bar is None:
        outputs_bar = jnp.zeros((times.shape[0], vector.shape[0]), vector.dtype)
    want_params = any(jtu.tree_leaves(perturbed[0]))
    want_times = any(jtu.tree_leaves(perturbed[2]))

    # Sequential under `vmap`, for the reason given in `_loop`.
    @jax.custom_batching.sequential_vmap
    def backward(params, vector, times, residuals, outputs_bar):
        return _backward(
            params,
            vector,
            times,
            residuals,
            outputs_bar,
            system,
            config,
            want_params,
            want_times,
        )

    grads = backward(params, vector, times, residuals, outputs_bar)
    if config.throw:
        # A NaN the operator's VJP produces on the backward pass only (the forward
        # pass was finite) must not reach the user as a quiet NaN gradient.
        finite_in = jnp.all(jnp.isfinite(outputs_bar))
        finite_out = jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(grads)])
        )
        grads = eqx.error_if(
            grads,
            finite_in & ~finite_out,
            "The gradient of the Krylov matrix function is not finite although its "
            "cotangent is: the operator's transpose or the VJP of its matvec "
            "produced NaN/inf on the backward pass.",
        )
    return jtu.tree_map(
        lambda g, p: g if p else None, grads, perturbed, is_leaf=lambda x: x is None
    )


def _backward(
    params,
    vector,
    times,
    residuals,
    outputs_bar,
    system,
    config,
    want_params,
    want_times,
):
    rec, dims, num_substeps = residuals
    num_times = times.shape[0]
    params_bar = jtu.tree_map(jnp.zeros_like, params)
    times_bar = jnp.zeros_like(times)
    w_bar = jnp.zeros_like(vector)

    def rebuild(start, s, buffer=None):
        return arnoldi.build(
            system.matvec, params, start, dims[s], config.max_dim, config.orth, buffer
        )

    def substep_start(k, s, starts):
        """The start of substep `s`, from its checkpoint and, when the stride is above
        one, the substeps after it: on entering a segment of `stride` substeps (from
        its end), all its starts are recomputed into `starts`."""
        if starts is None:
            return rec.checkpoints[s], starts
        first = (s // rec.stride) * rec.stride

        def recompute(starts):
            def advance(i, carry):
                starts, w = carry
                decomp = rebuild(w, first + i)
                w = approximation(
                    decomp,
                    dims[first + i],
                    rec.taus[first + i],
                    config.orth,
                    config.corrected,
                )
                return starts.at[i + 1].set(w), w

            w = rec.checkpoints[s // rec.stride]
            starts = starts.at[0].set(w)
            return lax.fori_loop(0, s - first, advance, (starts, w))[0]

        refresh = (k == 0) | (s % rec.stride == rec.stride - 1)
        starts = lax.cond(refresh, recompute, lambda starts: starts, starts)
        return starts[s - first], starts

    def body(k, carry):
        w_bar, params_bar, times_bar, starts, basis = carry
        s = num_substeps - 1 - k
        dim, tau, time0 = dims[s], rec.taus[s], rec.starts[s]
        first, last = rec.first[s], rec.last[s]
        start, starts = substep_start(k, s, starts)
        # The last substep's basis is kept from the forward pass; earlier ones are
        # rebuilt in the same buffer from their start vectors.
        decomp = lax.cond(
            k == 0,
            lambda basis: arnoldi.Decomposition((basis,), rec.hessenberg, rec.beta),
            lambda basis: rebuild(start, s, basis),
            basis,
        )

        def value_at(sigma, basis, hessenberg, beta):
            decomp = arnoldi.Decomposition((basis,), hessenberg, beta)
            return approximation(decomp, dim, sigma, config.orth, config.corrected)

        def output_bar(j):
            """The cotangent of output `j` if this substep covered it, else 0."""
            mine = (j >= first) & (j < last)
            return jnp.where(mine, outputs_bar[jnp.clip(j, 0, num_times - 1)], 0)

        def offset(j):
            return times[jnp.clip(j, 0, num_times - 1)] - time0

        # Outputs at the substep's end join the cotangent of its end value; the others
        # enter the adjoint where they were taken (visited from the end backwards).
        def at_end(j):
            return rec.ends[s] & (j == num_times - 1) | (offset(j) == tau)

        end_bar = w_bar
        for_end = jnp.arange(num_times)
        end_mask = (for_end >= first) & (for_end < last) & jax.vmap(at_end)(for_end)
        end_bar = end_bar + jnp.sum(
            jnp.where(end_mask[:, None], outputs_bar, 0), axis=0
        )
        single = arnoldi.single(decomp)

        if want_times:
            # Output j moves with t_j alone: d u(σ_j) / d t_j = A u(σ_j).
            def add_time_bar(j, times_bar):
                _, rate = jax.jvp(
                    lambda sigma: value_at(
                        sigma, single, decomp.hessenberg, decomp.beta
                    ),
                    (offset(j),),
                    (jnp.ones_like(tau),),
                )
                return times_bar.at[j].add(jnp.real(jnp.sum(output_bar(j) * rate)))

            times_bar = lax.fori_loop(first, last, add_time_bar, times_bar)

        if config.solution_adjoint:
            # From the end back to the first interior output with a nonzero
            # cotangent, then on to the next, ..., and finally to the start.
            def segment_cond(state):
                j, _, _, _ = state
                return j >= first - 1

            def segment_body(state):
                j, lam, params_bar, position = state
                ubar = output_bar(j)
                inject = (j >= first) & ~at_end(j) & jnp.any(ubar != 0)
                stop = jnp.where(j >= first, offset(j), jnp.zeros_like(tau))
                run = inject | (j == first - 1)

                def advance(lam, params_bar):
                    return _solution_adjoint(
                        system,
                        params,
                        decomp,
                        dim,
                        position,
                        position - stop,
                        lam,
                        params_bar,
                        config,
                        want_params,
                    )

                lam, params_bar = lax.cond(
                    run,
                    advance,
                    lambda lam, params_bar: (lam, params_bar),
                    lam,
                    params_bar,
                )
                lam = lam + jnp.where(inject, ubar, 0)
                position = jnp.where(run, stop, position)
                return j - 1, lam, params_bar, position

            _, start_bar, params_bar, _ = lax.while_loop(
                segment_cond,
                segment_body,
                (last - 1, end_bar, params_bar, tau),
            )
        else:

            def cotangents(j, acc):
                ubar = output_bar(j)
                _, vjp = jax.vjp(
                    lambda *d: value_at(offset(j), *d),
                    single,
                    decomp.hessenberg,
                    decomp.beta,
                )
                bars = vjp(jnp.where(at_end(j), 0, ubar))
                return jtu.tree_map(jnp.add, acc, bars)

            _, vjp = jax.vjp(
                lambda *d: value_at(tau, *d), single, decomp.hessenberg, decomp.beta
            )
            bars = lax.fori_loop(first, last, cotangents, vjp(end_bar))
            basis_bar, hessenberg_bar, beta_bar = bars
            start_bar, params_bar = arnoldi.reverse_sweep(
                system.matvec,
                params,
                decomp,
                dim,
                config.orth,
                basis_bar,
                hessenberg_bar,
                beta_bar,
                params_bar,
            )
        return start_bar, params_bar, times_bar, starts, single

    max_stride = _max_stride(config)
    starts = (
        None
        if max_stride == 1
        else jnp.zeros((max_stride,) + vector.shape, vector.dtype)
    )
    w_bar, params_bar, times_bar, _, _ = lax.fori_loop(
        0, num_substeps, body, (w_bar, params_bar, times_bar, starts, rec.basis)
    )
    return params_bar, w_bar, times_bar


class _TransposedSystem(eqx.Module):
    """`y ↦ Aᵀ y` (JAX's transpose, matching its cotangent convention) of a system."""

    system: Any

    def matvec(self, params, y):
        _, vjp = jax.vjp(lambda x: self.system.matvec(params, x), jnp.zeros_like(y))
        return vjp(y)[0]


# Rows per batched VJP in `_matvec_vjp_sum`.
_VJP_CHUNK = 8


def _matvec_vjp_sum(system, params, rows, weights, others, orth, count):
    """`∂θ Σ_{b < count} ⟨c_b, A(θ) rows_b⟩` with the cotangents `c_b = Σ_a
    weights[a, b] q_a` over the basis `others` (a decomposition whose basis is
    orthogonalised by `orth`), formed `_VJP_CHUNK` at a time.

    The VJPs of the matvec are batched `_VJP_CHUNK` rows at a time in a loop that
    stops at `count`: one batch of all rows makes XLA fuse a stencil into a reduction
    over rows and space, many times slower than applying it row by row, while one row
    at a time would repeat the parameter-only work of the matvec (an MLP coefficient
    field, say) for every row."""
    size = rows.shape[0]
    chunk = min(_VJP_CHUNK, size)

    def body(i, total):
        first = i * chunk
        start = jnp.minimum(first, size - chunk)  # the last chunk may overlap
        fresh = start + jnp.arange(chunk) >= first
        chunk_rows = lax.dynamic_slice_in_dim(rows, start, chunk)
        chunk_weights = lax.dynamic_slice_in_dim(weights, start, chunk, axis=1)
        chunk_weights = jnp.where(fresh[None, :], chunk_weights, 0)
        cotangents = arnoldi.weighted_sum(others, chunk_weights, orth)
        _, vjp = jax.vjp(
            lambda p: jax.vmap(lambda q: system.matvec(p, q))(chunk_rows), params
        )
        return jtu.tree_map(jnp.add, total, vjp(cotangents)[0])

    num_chunks = (count + chunk - 1) // chunk
    return lax.fori_loop(0, num_chunks, body, jtu.tree_map(jnp.zeros_like, params))


def _solution_adjoint(
    system,
    params,
    decomp,
    dim,
    position,
    length,
    w_bar,
    params_bar,
    config: _Config,
    want_params,
):
    """Cotangents of one substep `w ↦ u(tau) = exp(tau A(θ)) w` as the adjoint of the
    exact solution, over the part `[position - length, position]` of the substep
    (`w_bar`: the cotangent at `position`; the result: the one at `position - length`
    and the accumulated parameter cotangent).

    With `λ(s) = exp((tau - s)Aᵀ) w̄` and `u(s) = exp(sA) w`,

        w̄_start = λ(0),    θ̄ += ∫_0^tau ∂θ⟨λ(s), A(θ) u(s)⟩ ds.

    `λ` comes from an adaptive Krylov sweep of the transposed operator from `w̄`; on
    each of its substeps `λ(s) = Z z(s)` and `u(s) = Q y(s)` (the forward basis), so
    the integral is `∂θ Σ_b ⟨c_b, A(θ) q_b⟩` with `c_b = Σ_a G[a, b] z_a` and `G` the
    exact integral of `z(s) y(s)ᵀ` (`exp_gram`): VJPs of the matvec over the
    forward basis (`_matvec_vjp_sum`), done while the adjoint substep's basis is at
    hand. Both factors are solutions, smooth where the true ones are, so rough
    parameter directions are damped as they are by `exp(tau A)`.
    """
    orth = config.orth if config.orth.head == 0 else arnoldi.FULL
    inner = config._replace(orth=orth, solution_adjoint=False, direct=False)
    forward = extended_hessenberg(decomp.hessenberg, dim)
    m1 = forward.shape[0]
    forward_mask = coefficient_mask(m1, dim, config.corrected)

    def visit(time, adjoint, adjoint_dim, adjoint_tau):
        # This adjoint substep covers s from position - time back by its own tau.
        # A chunked basis holds both dimensions (`min_capacity` below), so the small
        # exponentials take its static capacity; a one-buffer basis is bucketed.
        size = arnoldi.capacity(adjoint, inner.orth)
        low = 1 if len(adjoint.basis) == 1 else size
        near = position - time - adjoint_tau
        y_near = exp_coefficients(decomp.hessenberg, dim, near, low=low)
        y_near = decomp.beta * y_near
        extended = extended_hessenberg(adjoint.hessenberg, adjoint_dim)
        gram = exp_gram(
            extended, adjoint_dim, forward, dim, y_near, adjoint_tau, low=low
        )
        adjoint_mask = coefficient_mask(m1, adjoint_dim, inner.corrected)
        gram = jnp.where(adjoint_mask[:, None] & forward_mask[None, :], gram, 0)
        gram = gram * adjoint.beta.astype(gram.dtype)
        return _matvec_vjp_sum(
            system, params, arnoldi.single(decomp), gram, adjoint, inner.orth, dim + 1
        )

    final, _, _ = _loop(
        params,
        w_bar,
        jnp.reshape(length, (1,)),
        _TransposedSystem(system),
        inner,
        False,
        visit if want_params else None,
        params_bar if want_params else None,
        min_capacity=dim + 1 if want_params else None,
    )
    return final.outputs[0], (final.visited if want_params else params_bar)


def _evaluate(primals, system, config: _Config):
    if config.direct:
        params, vector, times = primals
        final, result, stats = _loop(
            params, vector, times, system, config, record=False
        )
        return final.outputs, result, stats
    return _evaluate_custom(primals, system, config)


# ---------------------------------------------------------------------------------
# Front doors.


def expmv(
    operator: lx.AbstractLinearOperator | ArrayLike,
    vector: PyTree[ArrayLike],
    t: Real[ArrayLike, ""] | Real[ArrayLike, " times"] = 1.0,
    **options: Any,
) -> PyTree[Array]:
    """`exp(tA) v` by adaptive Krylov substepping.

    **Arguments:**

    - `operator`: a square `lineax.AbstractLinearOperator` or a square 2-D array.
    - `vector`: a pytree matching the operator's input structure and dtype.
    - `t`: a real scalar, or a 1-D array of monotone output times (one sweep).
    - `**options`: fields of [`krylovexp.KrylovExpm`][] (`rtol`, `atol`, `method`,
        `max_krylov_dim`, `max_substeps`, `adjoint`, `throw`, ...).

    **Returns:**

    `exp(tA) v` with the structure and dtype of `vector` (with a leading time axis
    for 1-D `t`).

    ```python
    import jax.numpy as jnp, lineax as lx, krylovexp as kx
    A = lx.MatrixLinearOperator(-jnp.eye(3))
    kx.expmv(A, jnp.ones(3), t=2.0)  # ≈ exp(-2)
    ```
    """
    return KrylovExpm(**options).expmv(operator, vector, t).value


def phimv(
    operator: lx.AbstractLinearOperator | ArrayLike,
    vectors: tuple[PyTree[ArrayLike], ...],
    t: Real[ArrayLike, ""] | Real[ArrayLike, " times"] = 1.0,
    **options: Any,
) -> PyTree[Array]:
    """`sum_{j=0}^{p} t^j phi_j(tA) b_j` for `vectors = (b_0, ..., b_p)`.

    `phi_0 = exp`, `phi_{j+1}(z) = (phi_j(z) - 1/j!) / z` (the phipm/KIOPS
    convention). Arguments and options as [`krylovexp.expmv`][].
    """
    return KrylovExpm(**options).phimv(operator, vectors, t).value
