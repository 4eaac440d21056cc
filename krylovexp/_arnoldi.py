"""The Krylov decomposition: one Arnoldi/Lanczos step, the loop over steps, and the
reverse sweep that gives its adjoint.

Everything works on flat 1-D vectors in fixed-size buffers:

- `basis` of shape `(m + 1, n)`: row `i` is the Krylov vector `q_i` (rows past the
  current dimension are zero or ignored);
- `hessenberg` of shape `(m + 1, m)`: column `j` holds the coefficients of
  `A q_j` in the basis, so that `A Q_k = Q_{k+1} H[:k+1, :k]`.

Orthogonalisation is described by an `Orthogonalisation` value: full (Arnoldi, with
classical Gram–Schmidt and a DGKS-guarded second pass), or incomplete against a
trailing window of vectors plus a fixed head of leading vectors (window 2 and no head
is the Lanczos three-term recurrence for Hermitian operators).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp


Matvec = Callable[[Any, jax.Array], jax.Array]


class Orthogonalisation(NamedTuple):
    """Which earlier basis vectors a new vector is orthogonalised against.

    `window=None` means all of them (full Arnoldi). Otherwise the last `window`
    vectors and the first `head` vectors.
    """

    window: int | None
    head: int = 0


FULL = Orthogonalisation(window=None)


def size_buckets(size: int, ratio: float = 4.0) -> tuple[int, ...]:
    """Static block sizes used to keep per-step work proportional to the dimension
    reached rather than to the buffer size (more buckets: less work, longer compile)."""
    buckets = []
    b = 16
    while 1.25 * b < size:
        buckets.append(b)
        b = int(b * ratio)
    buckets.append(size)
    return tuple(buckets)


def bucket_switch(
    needed: jax.Array, size: int, make_branch, *operands, ratio: float = 4.0
):
    """Run `make_branch(b)(*operands)` for the smallest static bucket `b >= needed`."""
    buckets = size_buckets(size, ratio)
    if len(buckets) == 1:
        return make_branch(buckets[0])(*operands)
    index = jnp.searchsorted(jnp.asarray(buckets), needed, side="left")
    index = jnp.minimum(index, len(buckets) - 1)
    return lax.switch(index, [make_branch(b) for b in buckets], *operands)


def safe_norm(x: jax.Array) -> jax.Array:
    """2-norm whose gradient is zero (not NaN) at `x = 0`."""
    sq = jnp.sum(jnp.real(x * jnp.conj(x)))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def safe_normalise(x: jax.Array, norm: jax.Array) -> jax.Array:
    """`x / norm`, and zero where `norm` is zero, with finite gradients."""
    positive = norm > 0
    return jnp.where(positive, x / jnp.where(positive, norm, 1).astype(x.dtype), 0)


def _project_out(basis_rows: jax.Array, mask: jax.Array, w: jax.Array):
    # Masking the coefficients rather than the rows avoids a masked copy of the rows
    # (the projection is memory-bound); rows past the current dimension are zero or
    # finite earlier vectors, so a zero coefficient removes them exactly.
    coeffs = jnp.where(mask, jnp.conj(basis_rows) @ w, 0)
    return coeffs, w - coeffs @ basis_rows


def orthonormalise(
    basis: jax.Array, w0: jax.Array, j: jax.Array, orth: Orthogonalisation
) -> tuple[jax.Array, jax.Array]:
    """Orthogonalise `w0 = A q_j` against the admissible rows of `basis` and normalise.

    Returns the new basis vector `q_{j+1}` (zero on breakdown) and the column
    `H[:, j]` of length `m + 1`, including the subdiagonal entry `h_{j+1,j}` (set to
    exactly zero on breakdown, so the Krylov space is treated as invariant).
    """
    m1, _ = basis.shape
    if orth.window is not None:
        rows, index = window_rows(basis, j, orth)
        return orthonormalise_rows(rows, index, w0, j, orth, m1)

    def branch(b):
        def project(basis, w0, j):
            rows = basis[:b]  # a copy on XLA:CPU: take it once for both passes
            mask = jnp.arange(b) <= j
            c1, w1 = _project_out(rows, mask, w0)
            # Second pass only when cancellation was severe (Daniel–Gragg–Kaufman–
            # Stewart criterion); "twice is enough".
            norm0, norm1 = safe_norm(w0), safe_norm(w1)
            c2, w2 = lax.cond(
                norm1 < 0.7071 * norm0,
                lambda rows, w: _project_out(rows, mask, w),
                lambda rows, w: (jnp.zeros_like(c1), w),
                rows,
                w1,
            )
            return jnp.zeros(m1, w0.dtype).at[:b].set(c1 + c2), w2

        return project

    coeffs, w = bucket_switch(j + 1, m1, branch, basis, w0, j, ratio=2.0)
    return _normalise(coeffs, w, w0, j)


def _normalise(coeffs, w, w0, j):
    eps = jnp.finfo(w0.dtype).eps
    h = safe_norm(w)
    breakdown = h <= 100 * eps * safe_norm(w0)
    h = jnp.where(breakdown, 0, h)
    q_next = safe_normalise(w, h)
    last = coeffs.shape[0] - 1
    column = coeffs.at[jnp.minimum(j + 1, last)].add(h.astype(coeffs.dtype))
    return q_next, column


def window_rows(basis, j, orth: Orthogonalisation):
    """The rows an incomplete step reads: the head, then a trailing window (a dynamic
    slice, so a step costs O(n (window + head))). Returns them and their indices."""
    m1, _ = basis.shape
    window = min(orth.window, m1)
    head = min(orth.head, m1)
    start = jnp.clip(j - window + 1, 0, m1 - window)
    index = jnp.concatenate([jnp.arange(head), start + jnp.arange(window)])
    window_part = lax.dynamic_slice_in_dim(basis, start, window)
    return jnp.concatenate([basis[:head], window_part]), index


def window_mask(index, j, orth: Orthogonalisation):
    in_head = jnp.arange(index.shape[0]) < orth.head
    return (index <= j) & (in_head | (index >= orth.head))


def orthonormalise_rows(rows, index, w0, j, orth: Orthogonalisation, m1: int):
    """Incomplete orthogonalisation (two classical Gram–Schmidt passes) against the
    given rows, then normalisation; see `orthonormalise`."""
    mask = window_mask(index, j, orth)
    c1, w = _project_out(rows, mask, w0)
    c2, w = _project_out(rows, mask, w)
    coeffs = jnp.zeros(m1, w0.dtype).at[index].add(jnp.where(mask, c1 + c2, 0))
    return _normalise(coeffs, w, w0, j)


class Decomposition(NamedTuple):
    """A Krylov decomposition in fixed-size buffers."""

    basis: jax.Array  # (m + 1, n)
    hessenberg: jax.Array  # (m + 1, m)
    beta: jax.Array  # norm of the start vector (real scalar)


def start(vector: jax.Array, max_dim: int) -> Decomposition:
    beta = safe_norm(vector)
    basis = jnp.zeros((max_dim + 1, vector.shape[0]), vector.dtype)
    basis = basis.at[0].set(safe_normalise(vector, beta))
    hessenberg = jnp.zeros((max_dim + 1, max_dim), vector.dtype)
    return Decomposition(basis, hessenberg, beta)


def step(
    matvec: Matvec,
    params: Any,
    decomp: Decomposition,
    j: jax.Array,
    orth: Orthogonalisation,
) -> tuple[Decomposition, jax.Array]:
    """Arnoldi step `j` (0-based): appends `q_{j+1}` and column `j` of H.

    Returns the new decomposition and whether the step broke down (`h_{j+1,j} = 0`).
    """
    basis, hessenberg, beta = decomp
    w0 = matvec(params, basis[j])
    q_next, column = orthonormalise(basis, w0, j, orth)
    basis = basis.at[j + 1].set(q_next)
    hessenberg = hessenberg.at[:, j].set(column)
    breakdown = column[j + 1] == 0
    return Decomposition(basis, hessenberg, beta), breakdown


def build(
    matvec: Matvec,
    params: Any,
    vector: jax.Array,
    dim: jax.Array,
    max_dim: int,
    orth: Orthogonalisation,
) -> Decomposition:
    """Rebuild a decomposition of a known dimension (no error checks, no early exit
    other than reaching `dim`). Used by the backward pass."""
    decomp = start(vector, max_dim)

    def body(j, decomp):
        return step(matvec, params, decomp, j, orth)[0]

    return lax.fori_loop(0, dim, body, decomp)


def reverse_sweep(
    matvec: Matvec,
    params: Any,
    decomp: Decomposition,
    dim: jax.Array,
    orth: Orthogonalisation,
    basis_bar: jax.Array,
    hessenberg_bar: jax.Array,
    beta_bar: jax.Array,
    params_bar: Any,
):
    """Adjoint of `dim` Arnoldi steps (Krämer et al., 2024): the steps are visited in
    reverse, each one linearised at its stored inputs, so the cost is one VJP of the
    matvec plus one projection per step and the memory is that of the basis.

    The matvec output of step `j` is not recomputed: it is read off the Arnoldi
    relation, `A q_j = sum_i H[i, j] q_i`.

    Returns the cotangent of the start vector and the accumulated parameter cotangent.
    """
    basis, hessenberg, beta = decomp
    m1 = basis.shape[0]
    rows = jnp.arange(m1)

    def body(k, carry):
        basis_bar, params_bar = carry
        j = dim - 1 - k
        outputs_bar = (basis_bar[j + 1], hessenberg_bar[:, j])
        if orth.window is None:
            column = jnp.where(rows <= j + 1, hessenberg[:, j], 0)
            w0 = column @ basis
            _, orth_vjp = jax.vjp(lambda b, w: orthonormalise(b, w, j, orth), basis, w0)
            b_bar, w0_bar = orth_vjp(outputs_bar)
            basis_bar = basis_bar + b_bar
        else:
            # Only the rows the step read get a cotangent: O(n) per Lanczos step.
            used, index = window_rows(basis, j, orth)
            coeffs = jnp.where(window_mask(index, j, orth), hessenberg[index, j], 0)
            w0 = coeffs @ used + hessenberg[j + 1, j] * basis[j + 1]
            _, orth_vjp = jax.vjp(
                lambda r, w: orthonormalise_rows(r, index, w, j, orth, m1), used, w0
            )
            used_bar, w0_bar = orth_vjp(outputs_bar)
            basis_bar = basis_bar.at[index].add(used_bar)
        _, mv_vjp = jax.vjp(matvec, params, basis[j])
        p_bar, q_bar = mv_vjp(w0_bar)
        basis_bar = basis_bar.at[j].add(q_bar)
        params_bar = jax.tree.map(jnp.add, params_bar, p_bar)
        return basis_bar, params_bar

    basis_bar, params_bar = lax.fori_loop(0, dim, body, (basis_bar, params_bar))

    def first_vector(vector):
        beta = safe_norm(vector)
        return safe_normalise(vector, beta), beta

    vector = basis[0] * beta.astype(basis.dtype)
    _, start_vjp = jax.vjp(first_vector, vector)
    (vector_bar,) = start_vjp((basis_bar[0], beta_bar))
    return vector_bar, params_bar
