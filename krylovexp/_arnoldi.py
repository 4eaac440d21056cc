"""The Krylov decomposition: one Arnoldi/Lanczos step, the loop over steps, and the
reverse sweep that gives its adjoint.

Everything works on flat 1-D vectors in fixed-size buffers:

- `basis`: a tuple of chunks, each of shape `(rows, n)`. Chunk 0 holds the Krylov
  vectors `q_0, q_1, ...` from row 0; every later chunk holds the next vectors after a
  short prefix that repeats the rows an incomplete step reads (the head vectors and
  the trailing window), so that a step reads and writes one chunk only. A growing
  space gets a new chunk when the last one is full; nothing is copied but the prefix.
- `hessenberg` of shape `(m + 1, m)`: column `j` holds the coefficients of `A q_j`
  in the basis, so that `A Q_k = Q_{k+1} H[:k+1, :k]`.

Orthogonalisation is described by an `Orthogonalisation` value: full (Arnoldi, with
classical Gram–Schmidt and a DGKS-guarded second pass), or incomplete against a
trailing window of vectors plus a fixed head of leading vectors. Window 2 without a
head is the Lanczos three-term recurrence for Hermitian operators, in its modified
form (Paige 1972): `w = A q_j - β_j q_{j-1}`, `α_j = ⟨q_j, w⟩`, `w -= α_j q_j`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp

from . import _batching as batching


Matvec = Callable[[Any, jax.Array], jax.Array]


class Orthogonalisation(NamedTuple):
    """Which earlier basis vectors a new vector is orthogonalised against.

    `window=None` means all of them (full Arnoldi). Otherwise the last `window`
    vectors and the first `head` vectors.
    """

    window: int | None
    head: int = 0
    # Whether the operator is known to be Hermitian: then the projection is real
    # symmetric tridiagonal and a step is the three-term recurrence `lanczos_step`.
    # Otherwise (a tridiagonal projection that is not Hermitian, e.g. of `-i H`) a
    # window of 2 is orthogonalised against by Gram-Schmidt.
    hermitian: bool = False


FULL = Orthogonalisation(window=None)


def is_lanczos(orth: Orthogonalisation) -> bool:
    """The three-term recurrence for Hermitian operators."""
    return orth.window == 2 and orth.head == 0 and orth.hermitian


def prefix_rows(orth: Orthogonalisation) -> int:
    """Rows repeated at the front of every chunk after the first."""
    return 0 if orth.window is None else orth.head + orth.window


_ONE_BUCKET_ROWS = 32


def row_buckets(
    rows: int, first: int = 8, one_bucket: int = _ONE_BUCKET_ROWS
) -> tuple[int, ...]:
    """Static row counts `first, 2 first, 4 first, ...` up to `rows` (the last one is
    `rows`).

    One family serves everywhere work should follow the Krylov dimension reached
    rather than the buffer size: the capacities a substep's basis grows through, the
    rows a projection reads, and the sizes of the small exponentials. A last bucket
    within 25% of `rows` is merged into it. Up to `one_bucket` rows there is one
    bucket: a 32×32 exponential costs microseconds, and every bucket is a compiled
    copy of the code that uses it. Gram–Schmidt projections, which read `n`-vectors,
    pass `one_bucket=first`."""
    if rows <= one_bucket:
        return (rows,)
    buckets = []
    b = first
    while b < rows:
        buckets.append(b)
        b *= 2
    if buckets and rows < 1.25 * buckets[-1]:
        buckets.pop()
    return tuple(buckets) + (rows,)


def bucket_switch(
    needed: jax.Array,
    size: int,
    make_branch,
    *operands,
    low: int = 1,
    one_bucket: int = _ONE_BUCKET_ROWS,
):
    """Run `make_branch(b)(*operands)` for the smallest bucket `b >= needed` of
    `row_buckets(size, one_bucket=one_bucket)`. `low` is a static lower bound on
    `needed`: buckets below it are never compiled."""
    buckets = row_buckets(size, one_bucket=one_bucket)
    first = next(i for i, b in enumerate(buckets) if b >= min(low, size))
    buckets = buckets[first:]
    if len(buckets) == 1:
        return make_branch(buckets[0])(*operands)
    # In the batched mode, the bucket that fits every element.
    needed = batching.batch_max(jnp.asarray(needed))
    # A handful of static buckets: compare all (the default scan is a while loop).
    index = jnp.searchsorted(
        jnp.asarray(buckets), needed, side="left", method="compare_all"
    )
    index = jnp.minimum(index, len(buckets) - 1)
    return lax.switch(index, [make_branch(b) for b in buckets], *operands)


def safe_norm(x: jax.Array) -> jax.Array:
    """2-norm whose gradient is zero (not NaN) at `x = 0`; NaN stays NaN (a NaN from
    the operator must not turn into a zero vector and an exact breakdown)."""
    sq = jnp.sum(jnp.real(x * jnp.conj(x)))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0 * sq)


def safe_normalise(x: jax.Array, norm: jax.Array) -> jax.Array:
    """`x / norm`, and zero where `norm` is zero, with finite gradients."""
    positive = norm > 0
    return jnp.where(positive, x / jnp.where(positive, norm, 1).astype(x.dtype), 0)


# ---------------------------------------------------------------------------------
# Orthogonalisation of one new vector.


def _project_out(basis_rows: jax.Array, mask: jax.Array, w: jax.Array):
    # Masking the coefficients rather than the rows avoids a masked copy of the rows
    # (the projection is memory-bound); rows past the current dimension are zero or
    # finite earlier vectors, so a zero coefficient removes them exactly.
    coeffs = jnp.where(mask, jnp.conj(basis_rows) @ w, 0)
    return coeffs, w - coeffs @ basis_rows


def _normalise(coeffs, w, j, removed_sq):
    """`q_{j+1} = w / ‖w‖` and the coefficient column with `h_{j+1,j}` in place.

    Breakdown (`h_{j+1,j} = 0`, the space is invariant) is declared when `‖w‖` is at
    round-off level relative to `‖A q_j‖`, whose square is `‖w‖² + removed_sq` with
    `removed_sq` the squared norm of the coefficients removed (Pythagoras: no extra
    pass over the vector)."""
    eps = jnp.finfo(w.dtype).eps
    h = safe_norm(w)
    breakdown = h <= 100 * eps * jnp.sqrt(h * h + removed_sq)
    h = jnp.where(breakdown, 0, h)
    q_next = safe_normalise(w, h)
    last = coeffs.shape[0] - 1
    column = coeffs.at[jnp.minimum(j + 1, last)].add(h.astype(coeffs.dtype))
    return q_next, column


def _squared(coeffs):
    return jnp.sum(jnp.real(coeffs * jnp.conj(coeffs)))


def orthonormalise_full(chunks, w0, j, column_size, low: int = 1):
    """Full orthogonalisation of `w0 = A q_j` against rows `0..j` held in `chunks`
    (chunk `c` holding rows from `sum of earlier chunk sizes`), then normalisation.

    Earlier chunks are full and read whole; the last chunk is read up to the
    smallest bucket holding row `j` (`low`: a static lower bound on `j + 1`).
    Classical Gram–Schmidt with a second pass only when cancellation was severe
    (Daniel–Gragg–Kaufman–Stewart criterion; "twice is enough").

    Returns `q_{j+1}` (zero on breakdown) and the column `H[:column_size, j]`."""
    *full, last = chunks
    offset = sum(c.shape[0] for c in full)

    def branch(b):
        def project(last, w0, j):
            rows = last[:b]  # a copy on XLA:CPU: take it once for both passes
            mask = offset + jnp.arange(b) <= j

            def one_pass(w):
                coeffs = []
                for c in full:
                    part, w = _project_out(c, jnp.ones(c.shape[0], bool), w)
                    coeffs.append(part)
                part, w = _project_out(rows, mask, w)
                return jnp.concatenate(coeffs + [part]), w

            c1, w1 = one_pass(w0)
            norm0, norm1 = safe_norm(w0), safe_norm(w1)
            c2, w2 = batching.cond(
                norm1 < 0.7071 * norm0,
                one_pass,
                lambda w: (jnp.zeros_like(c1), w),
                w1,
            )
            coeffs = c1 + c2
            column = jnp.zeros(column_size, w0.dtype).at[: coeffs.shape[0]].set(coeffs)
            return column, w2

        return project

    low_last = max(1, low - offset)
    # Buckets from 8 rows even in a chunk of up to 32: a step reads each row twice
    # or four times, and a rebuilt or transposed substep grows in one such chunk.
    column, w = bucket_switch(
        j + 1 - offset, last.shape[0], branch, last, w0, j, low=low_last, one_bucket=8
    )
    return _normalise(column, w, j, _squared(column))


def orthonormalise_window(chunk, base, w0, j, orth: Orthogonalisation, column_size):
    """Incomplete orthogonalisation of `w0 = A q_j` against the head rows and the
    trailing window of `chunk` (basis row `r >= head` at chunk index `r - base`, the
    head rows at chunk index `0..head-1`) by two classical Gram–Schmidt passes, then
    normalisation. Returns `q_{j+1}` and the column `H[:column_size, j]`."""
    rows, index = window_rows(chunk, base, j, orth)
    return _window_from_rows(rows, index, w0, j, orth, column_size)


def window_rows(chunk, base, j, orth: Orthogonalisation):
    """The rows an incomplete step reads from `chunk`: the head, then a trailing
    window (a dynamic slice, so a step costs O(n (window + head))). Returns them and
    their row indices in the basis."""
    size = chunk.shape[0]
    window = min(orth.window, size)
    head = min(orth.head, size)
    first = jnp.clip(j - window + 1, base + head, base + size - window)
    index = jnp.concatenate([jnp.arange(head), first + jnp.arange(window)])
    window_part = lax.dynamic_slice_in_dim(chunk, first - base, window)
    return jnp.concatenate([chunk[:head], window_part]), index


def window_mask(index, j, orth: Orthogonalisation):
    in_head = jnp.arange(index.shape[0]) < orth.head
    return (index <= j) & (in_head | (index >= orth.head))


def lanczos_step(previous, current, beta_j, w0, j, column_size):
    """The modified Lanczos recurrence for a Hermitian operator: from `w0 = A q_j`,
    `q_{j-1}` (`previous`, ignored for `j = 0`) and `β_j = h_{j,j-1}`, the next vector
    and the column of the (symmetric tridiagonal) projected matrix."""
    beta_j = jnp.where(j > 0, beta_j, 0)
    w = w0 - beta_j.astype(w0.dtype) * previous
    alpha = jnp.real(jnp.vdot(current, w)).astype(w0.dtype)
    w = w - alpha * current
    coeffs = jnp.zeros(column_size, w0.dtype)
    coeffs = coeffs.at[jnp.maximum(j - 1, 0)].add(jnp.where(j > 0, beta_j, 0))
    coeffs = coeffs.at[j].add(alpha)
    return _normalise(coeffs, w, j, _squared(alpha) + _squared(beta_j))


# ---------------------------------------------------------------------------------
# Decompositions.


class Decomposition(NamedTuple):
    """A Krylov decomposition in fixed-size buffers (see the module docstring)."""

    basis: tuple[jax.Array, ...]  # chunks of shape (rows, n)
    hessenberg: jax.Array  # (max_dim + 1, max_dim)
    beta: jax.Array  # norm of the start vector (real scalar)


def chunk_layout(decomp: Decomposition, orth: Orthogonalisation):
    """Per chunk: the first basis row it holds after its prefix, and the number of
    those rows. Static."""
    prefix = prefix_rows(orth)
    layout, offset = [], 0
    for i, chunk in enumerate(decomp.basis):
        skip = 0 if i == 0 else prefix
        layout.append((offset, skip, chunk.shape[0] - skip))
        offset += chunk.shape[0] - skip
    return layout


def capacity(decomp: Decomposition, orth: Orthogonalisation) -> int:
    """How many basis rows the chunks hold. Static."""
    return sum(own for _, _, own in chunk_layout(decomp, orth))


def start(
    vector: jax.Array,
    max_dim: int,
    rows: int | None = None,
    buffer: jax.Array | None = None,
) -> Decomposition:
    """A decomposition of dimension 0 from `vector`: in a new zeroed chunk of `rows`
    rows (default `max_dim + 1`), or written into row 0 of `buffer` (its other rows
    may hold stale, finite vectors; they are never read with a nonzero weight)."""
    beta = safe_norm(vector)
    first = safe_normalise(vector, beta)
    if buffer is None:
        size = max_dim + 1 if rows is None else rows
        buffer = jnp.zeros((size, vector.shape[0]), vector.dtype)
    hessenberg = jnp.zeros((max_dim + 1, max_dim), vector.dtype)
    return Decomposition((buffer.at[0].set(first),), hessenberg, beta)


def extend(decomp: Decomposition, rows: int, orth: Orthogonalisation) -> Decomposition:
    """Room for `rows` more basis vectors: a new chunk, whose prefix repeats the head
    rows and the last `window` rows (what an incomplete step reads)."""
    n = decomp.basis[0].shape[1]
    dtype = decomp.basis[0].dtype
    prefix = prefix_rows(orth)
    chunk = jnp.zeros((prefix + rows, n), dtype)
    if prefix:
        offset, skip, own = chunk_layout(decomp, orth)[-1]
        last = decomp.basis[-1]
        head = decomp.basis[0][: orth.head]
        window = last[skip + own - orth.window : skip + own]
        chunk = chunk.at[:prefix].set(jnp.concatenate([head, window]))
    return decomp._replace(basis=decomp.basis + (chunk,))


def single(decomp: Decomposition) -> jax.Array:
    """The one chunk of a decomposition grown in a single buffer."""
    (chunk,) = decomp.basis
    return chunk


def step(
    matvec: Matvec,
    params: Any,
    decomp: Decomposition,
    j: jax.Array,
    orth: Orthogonalisation,
    low: int = 1,
) -> tuple[Decomposition, jax.Array]:
    """Arnoldi step `j` (0-based): appends `q_{j+1}` and column `j` of H. Row `j + 1`
    must fall in the last chunk, and `j - window + 1 .. j` in it or its prefix.
    `low` is a static lower bound on `j + 1`.

    Returns the new decomposition and whether the step broke down (`h_{j+1,j} = 0`).
    """
    chunks, hessenberg, beta = decomp
    offset, skip, _ = chunk_layout(decomp, orth)[-1]
    base = offset - skip  # basis row r sits at index r - base of the last chunk
    last = chunks[-1]
    column_size = hessenberg.shape[0]
    if orth.window is None:
        w0 = matvec(params, _row(chunks, j, orth, decomp))
        q_next, column = orthonormalise_full(chunks, w0, j, column_size, low)
    elif is_lanczos(orth):
        current = lax.dynamic_index_in_dim(last, j - base, keepdims=False)
        previous = lax.dynamic_index_in_dim(
            last, jnp.maximum(j - 1 - base, 0), keepdims=False
        )
        w0 = matvec(params, current)
        beta_j = hessenberg[j, jnp.maximum(j - 1, 0)]
        q_next, column = lanczos_step(previous, current, beta_j, w0, j, column_size)
    else:
        w0 = matvec(params, lax.dynamic_index_in_dim(last, j - base, keepdims=False))
        q_next, column = orthonormalise_window(last, base, w0, j, orth, column_size)
    mask = batching.active()
    if mask is not None:
        # An element that does not advance keeps its row and column (see
        # `batching.loop`): the decomposition is never copied whole.
        kept = lax.dynamic_index_in_dim(last, j + 1 - base, keepdims=False)
        q_next = jnp.where(mask, q_next, kept)
        column = jnp.where(mask, column, hessenberg[:, j])
    last = lax.dynamic_update_index_in_dim(last, q_next, j + 1 - base, 0)
    hessenberg = hessenberg.at[:, j].set(column)
    breakdown = column[j + 1] == 0
    return Decomposition(chunks[:-1] + (last,), hessenberg, beta), breakdown


def _row(chunks, j, orth, decomp):
    """Basis row `j` for full orthogonalisation (`j` in the last chunk, or the last row
    of the one before when the last chunk is new)."""
    layout = chunk_layout(decomp, orth)
    offset, _, _ = layout[-1]
    last = chunks[-1]
    in_last = lax.dynamic_index_in_dim(last, jnp.maximum(j - offset, 0), keepdims=False)
    if len(chunks) == 1:
        return in_last
    before = chunks[-2][-1]
    return jnp.where(j >= offset, in_last, before)


def build(
    matvec: Matvec,
    params: Any,
    vector: jax.Array,
    dim: jax.Array,
    max_dim: int,
    orth: Orthogonalisation,
    buffer: jax.Array | None = None,
) -> Decomposition:
    """Rebuild a one-chunk decomposition of a known dimension (no error checks, no
    early exit other than reaching `dim`), into `buffer` if given (at least `dim + 1`
    rows). It repeats the arithmetic of a sweep that grew in one buffer exactly, and
    of one that grew in chunks up to round-off (the Gram–Schmidt sums are split by
    chunk there). Used by the backward pass."""
    decomp = start(vector, max_dim, buffer=buffer)

    def body(j, decomp):
        return step(matvec, params, decomp, j, orth)[0]

    return batching.fori(0, dim, body, decomp, merge=keep_decomposition)


def keep_decomposition(mask, new, old):
    """The batched mode's merge (see `batching.loop`) of a loop whose state starts
    with a decomposition that only `step` changes: `step` writes it under the mask of
    the live elements, so it is taken as it is rather than copied."""
    if isinstance(new, Decomposition):
        return new
    merged = batching.select(mask, new[1:], old[1:])
    return (new[0], *merged)


def weighted_sum(decomp: Decomposition, weights: jax.Array, orth: Orthogonalisation):
    """`Σ_r weights[r] q_r` over the basis rows (`weights`: rows first, any trailing
    shape), chunk by chunk."""
    total = None
    for (offset, skip, own), chunk in zip(
        chunk_layout(decomp, orth), decomp.basis, strict=True
    ):
        part = weights[offset : offset + own]
        if skip:
            padding = jnp.zeros((skip,) + part.shape[1:], part.dtype)
            part = jnp.concatenate([padding, part])
        term = jnp.tensordot(part, chunk, axes=(0, 0))
        total = term if total is None else total + term
    return total


def row(decomp: Decomposition, index: jax.Array, orth: Orthogonalisation):
    """Basis row `index` (dynamic) of a chunked decomposition."""
    result = None
    for (offset, skip, own), chunk in zip(
        chunk_layout(decomp, orth), decomp.basis, strict=True
    ):
        local = jnp.clip(index - offset + skip, 0, chunk.shape[0] - 1)
        candidate = lax.dynamic_index_in_dim(chunk, local, keepdims=False)
        mine = (index >= offset) & (index < offset + own)
        result = candidate if result is None else jnp.where(mine, candidate, result)
    return result


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
    """Adjoint of `dim` Arnoldi steps of a one-chunk decomposition (Krämer et al.,
    2024): the steps are visited in reverse, each one linearised at its stored
    inputs, so the cost is one VJP of the matvec plus one projection per step and the
    memory is that of the basis.

    The matvec output of step `j` is not recomputed: it is read off the Arnoldi
    relation, `A q_j = sum_i H[i, j] q_i`.

    Returns the cotangent of the start vector and the accumulated parameter cotangent.
    """
    basis = single(decomp)
    _, hessenberg, beta = decomp
    m1 = basis.shape[0]
    column_size = hessenberg.shape[0]
    rows = jnp.arange(m1)

    def body(k, carry):
        basis_bar, hessenberg_bar, params_bar = carry
        j = dim - 1 - k
        outputs_bar = (basis_bar[j + 1], hessenberg_bar[:, j])
        if orth.window is None:
            column = jnp.where(rows <= j + 1, hessenberg[:m1, j], 0)
            w0 = column @ basis

            def full_step(b, w):
                return orthonormalise_full((b,), w, j, column_size)

            _, orth_vjp = jax.vjp(full_step, basis, w0)
            b_bar, w0_bar = orth_vjp(outputs_bar)
            basis_bar = basis_bar + b_bar
        elif is_lanczos(orth):
            previous = basis[jnp.maximum(j - 1, 0)]
            current = basis[j]
            beta_j = hessenberg[j, jnp.maximum(j - 1, 0)]
            w0 = (
                jnp.where(j > 0, beta_j, 0) * previous
                + hessenberg[j, j] * current
                + hessenberg[j + 1, j] * basis[j + 1]
            )
            _, step_vjp = jax.vjp(
                lambda p, c, b, w: lanczos_step(p, c, b, w, j, column_size),
                previous,
                current,
                beta_j,
                w0,
            )
            previous_bar, current_bar, beta_bar_j, w0_bar = step_vjp(outputs_bar)
            basis_bar = basis_bar.at[jnp.maximum(j - 1, 0)].add(
                jnp.where(j > 0, previous_bar, 0)
            )
            basis_bar = basis_bar.at[j].add(current_bar)
            # β_j is h_{j,j-1}, an output of step j - 1: its cotangent joins that one.
            hessenberg_bar = hessenberg_bar.at[j, jnp.maximum(j - 1, 0)].add(
                jnp.where(j > 0, beta_bar_j, 0)
            )
        else:
            # Only the rows the step read get a cotangent: O(n) per step.
            used, index = window_rows(basis, 0, j, orth)
            coeffs = jnp.where(window_mask(index, j, orth), hessenberg[index, j], 0)
            w0 = coeffs @ used + hessenberg[j + 1, j] * basis[j + 1]
            _, orth_vjp = jax.vjp(
                lambda r, w: _window_from_rows(r, index, w, j, orth, column_size),
                used,
                w0,
            )
            used_bar, w0_bar = orth_vjp(outputs_bar)
            basis_bar = basis_bar.at[index].add(used_bar)
        _, mv_vjp = jax.vjp(matvec, params, basis[j])
        p_bar, q_bar = mv_vjp(w0_bar)
        basis_bar = basis_bar.at[j].add(q_bar)
        params_bar = jax.tree.map(jnp.add, params_bar, p_bar)
        return basis_bar, hessenberg_bar, params_bar

    basis_bar, _, params_bar = batching.fori(
        0, dim, body, (basis_bar, hessenberg_bar, params_bar)
    )

    def first_vector(vector):
        beta = safe_norm(vector)
        return safe_normalise(vector, beta), beta

    vector = basis[0] * beta.astype(basis.dtype)
    _, start_vjp = jax.vjp(first_vector, vector)
    (vector_bar,) = start_vjp((basis_bar[0], beta_bar))
    return vector_bar, params_bar


def _window_from_rows(rows, index, w0, j, orth, column_size):
    mask = window_mask(index, j, orth)
    c1, w = _project_out(rows, mask, w0)
    c2, w = _project_out(rows, mask, w)
    coeffs = jnp.zeros(column_size, w0.dtype).at[index].add(jnp.where(mask, c1 + c2, 0))
    return _normalise(coeffs, w, j, _squared(c1 + c2))
