"""Adaptive Krylov evaluation of `exp(tA) v` and of phi-function combinations: the
front door `KrylovExpm` (options, checks, configuration), the augmented operator of
`phimv`, and the functions `expmv` and `phimv`. The sweep lives in `_sweep.py`, its
substeps in `_substep.py` and the custom adjoint in `_backward.py`."""

from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, PyTree, Real

from . import _arnoldi as arnoldi
from ._adjoints import AbstractKrylovAdjoint, KrylovAdjoint
from ._batching import Batching, resolve as resolve_batching
from ._config import _Config
from ._diagonal import diagonal_phimv, is_diagonal_operator
from ._operator import (
    AbstractSystem,
    as_operator,
    check_vector,
    flatten,
    hermitian_tagged,
    lanczos_applicable,
    operator_dtype,
    operator_size,
)
from ._solution import RESULTS, Solution, error_if


_DEFAULT_MAX_DIM = {"arnoldi": 64, "lanczos": 100}


Method = Literal["auto", "arnoldi", "lanczos"]


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
    - `batching`: how `jax.vmap` runs the adaptive loops: `"sequential"` (one element
        after another, each with its own loops, as fast per solve as unbatched),
        `"batched"` (one loop for the whole batch: every matvec is applied to the
        batch at once, and each element's Krylov dimension, step size and acceptance
        are its own, under a mask), or `"auto"` (default: sequential on CPU, batched on
        accelerators). Results are the same either way, to round-off.
    - `batch_size`: in the batched mode, advance at most this many elements together
        and the groups one after another (as `jax.lax.map(..., batch_size=...)`);
        default: the whole batch. On CPU small groups (2–4) keep the bases in cache.
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
    batching: Batching = eqx.field(default="auto", static=True)
    batch_size: int | None = eqx.field(default=None, static=True)

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
        if self.batching not in ("auto", "sequential", "batched"):
            raise ValueError(
                "`batching` must be one of 'auto', 'sequential', 'batched', got "
                f"{self.batching!r}."
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(
                f"`batch_size` must be at least 1 or None, got {self.batch_size}."
            )
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
        return _compiled_expmv(self, operator, vector, _as_time(t))

    def _expmv(self, operator, vector, t) -> Solution:
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
        return _compiled_phimv(self, operator, tuple(vectors), _as_time(t))

    def _phimv(self, operator, vectors, t) -> Solution:
        op = as_operator(operator)
        for j, b in enumerate(vectors):
            check_vector(op, b, f"vectors[{j}]")
        if is_diagonal_operator(op):
            return diagonal_phimv(self, op, tuple(vectors), t)
        if len(vectors) == 1:
            return self._expmv(op, vectors[0], t)
        p = len(vectors) - 1
        flats = [ravel_pytree(b)[0] for b in vectors]
        _, unravel = ravel_pytree(vectors[0])
        base_params, base = flatten(op)
        coupling = jnp.stack(flats[:0:-1])  # W^T: rows b_p, ..., b_1
        scales = _tail_scales(jnp.linalg.norm(coupling, axis=1)[::-1], t)[::-1]
        coupling = coupling / scales[:, None].astype(coupling.dtype)
        dtype = flats[0].dtype
        tail = jnp.zeros(p, dtype).at[-1].set(scales[-1].astype(dtype))
        system = _AugmentedSystem(base, _tail_groups(flats[0].shape[0], p))
        start = system.join(flats[0], tail)
        ratios = (scales[:-1] / scales[1:]).astype(coupling.dtype)
        params = (base_params, coupling, ratios)
        return self._run(params, system, op, start, unravel, t, p)

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
        outputs, result, stats = self.adjoint.evaluate(
            params, flat_vector, times, system, config
        )
        # The result code and statistics carry no derivative information.
        result, stats = lax.stop_gradient((result, stats))
        if augmented:
            outputs = jax.vmap(lambda x: system.split(x, augmented)[0])(outputs)
        if self.throw:
            outputs = error_if(outputs, result != RESULTS.successful, result)
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
                window=2,
                head=augmented + 1 if augmented else 0,
                hermitian=augmented == 0 and hermitian_tagged(op),
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
            corrected=self.corrected,
            throw=self.throw,
            batching=resolve_batching(self.batching),
            batch_size=self.batch_size,
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


# See `_tail_groups`.
_MAX_TAIL_GROUPS = 64


def _tail_groups(n: int, p: int) -> int:
    """Into how many equal parts `_AugmentedSystem` splits the head of its vectors:
    the largest power of two up to `_MAX_TAIL_GROUPS` and up to the number of devices
    that divides `n` and keeps the padding (`p` entries per part) within `n / 16`; 1
    for a small or odd `n`, and on one device.

    A state is cut into at most as many tiles as there are devices, so more parts
    keep no tile in place that fewer would not; and they cost: every matvec then
    reads its vector through the parts' strides (a 48² Allen–Cahn `Exprb43`
    gradient on one CPU took 20 % longer with 32 parts than with one)."""
    limit = min(_MAX_TAIL_GROUPS, jax.device_count())
    groups = 1
    while 2 * groups <= limit and n % (2 * groups) == 0 and 2 * groups * p * 16 <= n:
        groups *= 2
    return groups


class _AugmentedSystem(AbstractSystem):
    """The augmented operator `[[A, W D^-1], [0, D J D^-1]]` of the phi-function
    identity, with the tail scaling `D` of `_tail_scales`.

    Its vectors hold the head (length n) in `groups` equal parts, each followed by
    `p` slots: the tail in those of the first part, zeros (which stay zero) in the
    others (`join`, `split`). With one part this is `[head; tail]`. A head sharded
    over up to `groups` devices (a power of two) keeps its tiles in this layout;
    after a plain concatenation each device's tile would straddle its neighbour's
    and XLA would gather the whole vector at every matvec."""

    base: AbstractSystem
    groups: int = eqx.field(static=True)

    def join(self, head, tail):
        if self.groups == 1:
            return jnp.concatenate([head, tail])
        parts = head.reshape(self.groups, -1)
        slots = jnp.zeros((self.groups, tail.shape[0]), tail.dtype).at[0].set(tail)
        return jnp.concatenate([parts, slots], axis=1).reshape(-1)

    def split(self, x, p):
        """`(head, tail)` of an augmented vector with a tail of length `p`."""
        if self.groups == 1:
            n = x.shape[0] - p
            return x[:n], x[n:]
        parts = x.reshape(self.groups, -1)
        return parts[:, :-p].reshape(-1), parts[0, -p:]

    def matvec(self, params, x):
        # coupling rows: b_p / d_p, ..., b_1 / d_1; ratios: d_j / d_(j-1), j = p..2.
        base_params, coupling, ratios = params
        head, tail = self.split(x, coupling.shape[0])
        top = self.base.matvec(base_params, head) + tail @ coupling
        shifted = jnp.concatenate([ratios * tail[1:], jnp.zeros(1, tail.dtype)])
        return self.join(top, shifted)


# ---------------------------------------------------------------------------------
# Front doors.


def _as_time(t):
    # An array, so that a new value of `t` reuses the compiled sweep (a Python float
    # would be a static argument of `filter_jit`).
    return t if isinstance(t, jax.Array) else jnp.asarray(t)


# Called outside `jit`, the sweep would otherwise run op by op, compiling each of its
# loops afresh on every call (seconds each time); as in `lineax.linear_solve` and
# `diffrax.diffeqsolve`, one compiled program serves every call with the same
# structure. Inside a `jit` it is traced as part of the caller.
_compiled_expmv = eqx.filter_jit(KrylovExpm._expmv)
_compiled_phimv = eqx.filter_jit(KrylovExpm._phimv)


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
