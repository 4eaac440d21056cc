"""The projected (small, dense) problem: `exp(tau H) e_1` for the Hessenberg matrix of
a Krylov decomposition, the approximation it defines, and its error estimate.

With `k` Krylov vectors, H_ext is the `(k+1) x (k+1)` matrix whose first `k` columns
are `H[:k+1, :k]` (the Hessenberg matrix plus the row of `h_{k+1,k}`) and whose last
column is zero. Its exponential carries both the approximation and the estimate:

    exp(tau H_ext) e_1 = [exp(tau H_k) e_1 ; h_{k+1,k} tau e_k^T phi_1(tau H_k) e_1],

(Saad 1992, Sidje 1998). The last entry times `beta` is the a-posteriori error
estimate of the plain approximation `beta Q_k exp(tau H_k) e_1`; we return the
corrected approximation `beta Q_{k+1} exp(tau H_ext) e_1`, which uses that entry too.
"""

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np

from . import _batching as batching
from ._arnoldi import Decomposition, Orthogonalisation, bucket_switch, weighted_sum


# Taylor polynomial of degree 18, evaluated by Paterson–Stockmeyer in powers of A^4.
_DEGREE = 18
_TAYLOR = np.array([1.0 / math.factorial(k) for k in range(_DEGREE + 1)] + [0.0])
# With ||A||_1 <= 1 the truncation error is below sum_{k>18} 1/k! ~ 8e-18, under the
# unit roundoff of double precision relative to ||exp(A)|| >= 1/e.
_THETA = 1.0
_MAX_SQUARINGS = 40


def _scaled_taylor_exp(parts, mul, identity, norm, rounding=False, differentiable=True):
    """Scaling and squaring of the degree-18 Taylor polynomial for a matrix given as
    a tuple of blocks with its own product `mul` (so that structure is kept).

    With `rounding=True` (single block only) returns the result and the bound of
    `_squarings_with_rounding`. The squarings run in a loop of exactly as many trips
    as needed, except with `differentiable=True`, where reverse mode needs a loop of
    fixed length (`_MAX_SQUARINGS` conditional trips, which cost more than the
    products at these sizes)."""
    dtype = parts[0].dtype
    c = [jnp.asarray(x, dtype) for x in _TAYLOR]
    squarings = jnp.maximum(0, jnp.ceil(jnp.log2(norm / _THETA)))
    squarings = jnp.where(jnp.isfinite(squarings), squarings, 2 * _MAX_SQUARINGS)
    a1 = tuple(x / (2.0**squarings).astype(dtype) for x in parts)
    a2 = mul(a1, a1)
    a3 = mul(a2, a1)
    a4 = mul(a2, a2)
    powers = (identity, a1, a2, a3)

    def block(i):
        return tuple(
            sum(c[4 * i + j] * powers[j][b] for j in range(4)) for b in range(len(a1))
        )

    result = block(4)
    for i in (3, 2, 1, 0):
        result = tuple(x + y for x, y in zip(mul(result, a4), block(i), strict=True))

    if rounding:
        result, excess = _squarings_with_rounding(result[0], squarings)
        valid = squarings <= _MAX_SQUARINGS
        return jnp.where(valid, result, jnp.nan), jnp.where(valid, excess, jnp.inf)

    if differentiable:

        def square(i, r):
            return batching.cond(i < squarings, lambda r: mul(r, r), lambda r: r, r)

        result = lax.fori_loop(0, _MAX_SQUARINGS, square, result)
    else:
        limit = jnp.minimum(squarings, _MAX_SQUARINGS)
        _, result = batching.loop(
            lambda state: state[0] < limit,
            lambda state: (state[0] + 1, mul(state[1], state[1])),
            (jnp.zeros_like(limit), result),
        )
    return tuple(jnp.where(squarings <= _MAX_SQUARINGS, x, jnp.nan) for x in result)


def _norm1(x):
    return jnp.max(jnp.sum(jnp.abs(x), axis=0))


def _squarings_with_rounding(x, squarings):
    """`x^(2^squarings)` by repeated squaring, and a first-order bound on the rounding
    error the squarings add beyond the unavoidable.

    A rounded product obeys `|fl(XY) - XY| <= u |X| |Y|` elementwise (unit roundoff
    `u`). If `X_k` carries a relative error `r_k` elementwise, then
    `|E_{k+1}| <= (2 r_k + u) |X_k| |X_k|`, so in the 1-norm
    `r_{k+1} <= (2 r_k + u) c_k` with `c_k = ||X_k| |X_k|| / |X_k^2| >= 1` (cf.
    Higham 2005, §2, on the squaring phase). Without cancellation in the products
    (a nonnegative matrix, such as the exponential of a real Lanczos matrix, or one
    diagonally similar to it) `c_k = 1` and `r_s = (2^(s+1) - 1) u`, the accuracy of
    any scaling and squaring. Far from normal the entries of `X_k^2` cancel and `r_s`
    explodes, and so does the actual error: a 3x3 operator with eigenvalues ±1.53
    and a coupling of 3e9 projects (at the breakdown of its Krylov space) onto
    `H = [[-1.47e9, -1.47e9], [1.47e9, 1.47e9]]`, whose computed `exp(0.1 H)` has
    norm 1e153 instead of 3e8, and `r_s = 1e88`. Returns the result and
    `|X_s| max(0, r_s - (2^(s+1) - 1) u)`, the part of the bound beyond the
    cancellation-free case (zero where the result overflows, which the caller
    reports as such)."""
    u = jnp.finfo(x.dtype).eps / 2
    real = jnp.finfo(x.dtype).dtype

    def step(state):
        i, x, r = state
        x2 = x @ x
        # ||(|X| |X|)||_1 = max_j (1^T |X| |X|)_j: a vector-matrix product, not a
        # second matrix product (every term is nonnegative, so nothing cancels).
        magnitude = jnp.max(jnp.sum(jnp.abs(x), axis=0) @ jnp.abs(x))
        ratio = magnitude / jnp.maximum(_norm1(x2), jnp.finfo(real).tiny)
        # The two norms sum the same nonnegative terms in different orders (each
        # within b u of the exact sum): a ratio that close to 1 is 1. Otherwise the
        # ulps compound over up to 40 squarings into a spurious bound.
        ratio = jnp.where(ratio <= 1 + 4 * x.shape[0] * u, 1, ratio)
        return i + 1, x2, (2 * r + u) * ratio

    # Exactly `squarings` trips (this result is never differentiated): a loop of
    # `_MAX_SQUARINGS` conditional trips costs more than the products at these sizes.
    limit = jnp.minimum(squarings, _MAX_SQUARINGS)
    _, x, r = batching.loop(
        lambda state: state[0] < limit,
        step,
        (jnp.asarray(0, limit.dtype), x, jnp.asarray(u, real)),
    )
    normal = (2.0 ** (squarings + 1) - 1) * u
    excess = _norm1(x) * jnp.maximum(r - normal, 0).astype(real)
    return x, jnp.where(jnp.all(jnp.isfinite(x)), excess, 0)


def expm_small(matrix: jax.Array, differentiable: bool = True) -> jax.Array:
    """Dense exponential of a small matrix by scaling and squaring a degree-18 Taylor
    polynomial (Paterson–Stockmeyer: 7 matrix products, no linear solve, so no LAPACK
    call and no BLAS thread pool; cf. Al-Mohy & Higham 2009, Sastre et al. 2019).
    With `differentiable` the squarings are a fixed-length scan, which reverse mode
    can differentiate. Returns NaN if the norm is beyond 2^40."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    norm = jnp.max(jnp.sum(jnp.abs(matrix), axis=0))
    (result,) = _scaled_taylor_exp(
        (matrix,), lambda a, b: (a[0] @ b[0],), (eye,), norm, False, differentiable
    )
    return result


def expm_small_checked(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`expm_small(matrix)` and a bound on the rounding error its squarings add beyond
    those of a normal matrix (1-norm, absolute; see `_squarings_with_rounding`);
    infinite where `expm_small` gives NaN."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    norm = _norm1(matrix)
    return _scaled_taylor_exp(
        (matrix,), lambda a, b: (a[0] @ b[0],), (eye,), norm, rounding=True
    )


def expm_corner(left: jax.Array, coupling: jax.Array, right: jax.Array) -> jax.Array:
    """The upper right block of `exp([[left, coupling], [0, right]])`, i.e.
    `∫_0^1 exp((1 - r) left) coupling exp(r right) dr` (Van Loan 1978), with block
    triangular products (4 block products instead of the 8 of a dense product)."""

    def mul(a, b):
        return (a[0] @ b[0], a[0] @ b[1] + a[1] @ b[2], a[2] @ b[2])

    eye = jnp.eye(left.shape[0], dtype=left.dtype)
    columns = jnp.maximum(
        jnp.max(jnp.sum(jnp.abs(left), axis=0)),
        jnp.max(jnp.sum(jnp.abs(coupling), axis=0) + jnp.sum(jnp.abs(right), axis=0)),
    )
    identity = (eye, jnp.zeros_like(coupling), eye)
    parts = (left, coupling, right)
    # Only the backward pass evaluates it, and nothing differentiates that.
    return _scaled_taylor_exp(parts, mul, identity, columns, differentiable=False)[1]


def extended_hessenberg(
    hessenberg: jax.Array, dim: jax.Array, size: int | None = None
) -> jax.Array:
    """`H_ext` of Krylov dimension `dim`, zero-padded to `size x size` (default
    `(m + 1) x (m + 1)`; at least that)."""
    m1, m = hessenberg.shape
    size = m1 if size is None else size
    rows = jnp.arange(m1)[:, None]
    cols = jnp.arange(m)[None, :]
    masked = jnp.where((rows <= dim) & (cols < dim), hessenberg, 0)
    return jnp.zeros((size, size), hessenberg.dtype).at[:m1, :m].set(masked)


def exp_coefficients(
    hessenberg: jax.Array,
    dim: jax.Array,
    tau: jax.Array,
    low: int = 1,
    differentiable: bool = True,
) -> jax.Array:
    """First column of `exp(tau H_ext)` for Krylov dimension `dim`, padded to `m + 1`.

    Entries past `dim` are zero; entry `dim` is the error-estimate term. The
    exponential is taken at the smallest bucket holding `dim + 1` rows (O(b³) work);
    `low` is a static lower bound on `dim + 1`. `differentiable=False` where nothing
    differentiates it in reverse mode (see `expm_small`).
    """
    m1, _ = hessenberg.shape
    step = jnp.asarray(tau).astype(hessenberg.dtype)

    def branch(b):
        def first_column(hessenberg):
            extended = _leading_extended(hessenberg, dim, b)
            column = expm_small(step * extended, differentiable)[:, 0]
            return jnp.zeros(m1, hessenberg.dtype).at[:b].set(column)

        return first_column

    return bucket_switch(dim + 1, m1, branch, hessenberg, low=low)


def _leading_extended(hessenberg: jax.Array, dim: jax.Array, size: int) -> jax.Array:
    """The leading `size x size` block of `H_ext` (`size >= dim + 1`), read from
    the leading rows and columns of the Hessenberg buffer only."""
    return extended_hessenberg(hessenberg[:size, : size - 1], dim, size)


# Subdiagonal entries below this fraction of the largest entry of the projected
# matrix are treated as possibly hiding a larger coupling (see `checked_coefficients`).
_COUPLING_FLOOR = 1e-2
# Power iterations for the norm of the projected propagator.
_POWER_ITERATIONS = 8


def _weak_coupling_lift(extended: jax.Array, dim: jax.Array) -> jax.Array:
    """`prod_i floor_i / h_{i+1,i}` over the weak subdiagonal entries (1 where none is
    weak, 0 after a breakdown): how much larger Saad's estimate term would be had
    the weak couplings been ordinary ones (see `checked_coefficients`)."""
    m1 = extended.shape[0]
    real = jnp.finfo(extended.dtype).dtype
    index = jnp.arange(m1 - 1)
    # The scale seen up to step i: the largest entry of the first i + 1 columns.
    # (A masked maximum rather than `lax.cummax`: one fused reduction on XLA:CPU.)
    columns = jnp.max(jnp.abs(extended), axis=0)
    before = jnp.arange(m1)[None, :] <= jnp.arange(m1)[:, None]
    seen = jnp.max(jnp.where(before, columns[None, :], 0), axis=1)[: m1 - 1]
    floor = _COUPLING_FLOOR * seen
    subdiagonal = jnp.abs(extended[index + 1, index])
    weak = (index < dim) & (subdiagonal < floor) & (subdiagonal > 0)
    breakdown = subdiagonal[jnp.maximum(dim - 1, 0)] == 0
    ratio = jnp.where(weak, floor / jnp.where(weak, subdiagonal, 1), 1)
    log_lift = jnp.minimum(jnp.sum(jnp.log(ratio)), 0.5 * jnp.log(jnp.finfo(real).max))
    return jnp.where(breakdown, 0, jnp.exp(log_lift))


def _spectral_norm(exp: jax.Array, dim: jax.Array) -> jax.Array:
    """`||exp(tau H_k)||_2` from `exp(tau H_ext)` (its top left k x k block) by
    `_POWER_ITERATIONS` power iterations on `X^H X` from the vector of ones: a lower
    bound, accurate to a few per cent on these small matrices. Matrix-vector products
    only (O(b²) each; forming `X^H X` and squaring it costs a few O(b³) products,
    more than the small exponential's squarings at the larger buckets)."""
    active = jnp.arange(exp.shape[0]) < dim
    exp = jnp.where(active[:, None] & active[None, :], exp, 0)
    y = jnp.where(active, 1.0, 0.0).astype(exp.dtype)

    def iteration(_, y):
        z = jnp.conj(exp.T) @ (exp @ y)
        # Rescaled every time, so that nothing overflows or underflows.
        largest = jnp.max(jnp.abs(z))
        return z / jnp.where(largest > 0, largest, 1).astype(z.dtype)

    y = lax.fori_loop(0, _POWER_ITERATIONS, iteration, y)
    size = jnp.linalg.norm(y)
    y = y / jnp.where(size > 0, size, 1).astype(y.dtype)
    return jnp.linalg.norm(exp @ y)


def checked_coefficients(
    hessenberg: jax.Array, dim: jax.Array, tau: jax.Array, low: int = 1
):
    """`exp_coefficients` with what acceptance needs to trust them.

    **Returns:** `(coeffs, rounding, guard, norm)`:

    - `coeffs`: the first column of `exp(tau H_ext)`, as `exp_coefficients`.
    - `rounding`: the bound of `expm_small_checked` on the rounding error of the small
      exponential beyond that of a normal matrix (relative to `beta`).
    - `guard`: Saad's estimate term had every weak subdiagonal entry been an ordinary
      one (0 after a breakdown, an exact invariant subspace). The estimate term, entry
      `(k+1, 1)` of `exp(tau H_ext)`, is a sum over paths from row 1 down to row
      `k+1` of the Hessenberg matrix, each of which passes every subdiagonal entry
      `h_{i+1,i}`: it is proportional to each weak entry to leading order. An entry
      that is tiny but not zero means the start vector lies close to, not in, an
      invariant subspace, and the estimate then says nothing of how strongly the
      operator acts beyond it, a direction no matvec has explored yet
      (`A = [[-3, 0, 0], [1e-9, 0, 0], [0, 1e3, 0]]`, `v = e_1` was accepted at
      dimension 1 with estimate 3e-10 while the error was 2e-7). An entry is weak
      below `_COUPLING_FLOOR` times the largest entry of columns `1..i` (the
      operator's scale as seen when it was computed); the guard scales the estimate
      term by `floor_i / h_{i+1,i}` for each.
    - `norm`: an estimate of `||exp(tau H_k)||_2`, how much the substep's propagator
      can amplify a vector of the Krylov space (for `stats['growth_factor']`).
    """
    m1, _ = hessenberg.shape
    step = jnp.asarray(tau).astype(hessenberg.dtype)

    def branch(b):
        def run(hessenberg):
            # Everything at the bucket's size: past it H_ext is zero.
            extended = _leading_extended(hessenberg, dim, b)
            exp, rounding = expm_small_checked(step * extended)
            column = jnp.zeros(m1, exp.dtype).at[:b].set(exp[:, 0])
            lift = _weak_coupling_lift(extended, dim).astype(rounding.dtype)
            return column, rounding, _spectral_norm(exp, dim), lift

        return run

    coeffs, rounding, norm, lift = bucket_switch(
        dim + 1, m1, branch, hessenberg, low=low
    )
    guard = jnp.abs(coeffs[dim]) * lift
    return coeffs, rounding, guard, norm


def error_estimate(decomp: Decomposition, coeffs: jax.Array, dim: jax.Array):
    """A-posteriori 2-norm error estimate `beta |h_{k+1,k} tau e_k^T phi_1(tau H) e_1|`
    of the Krylov approximation of dimension `dim` (Saad 1992)."""
    return decomp.beta * jnp.abs(coeffs[dim])


def combine(
    decomp: Decomposition,
    coeffs: jax.Array,
    dim: jax.Array,
    orth: Orthogonalisation,
    corrected: bool = True,
    low: int = 1,
) -> jax.Array:
    """The corrected approximation `beta Q_{k+1} exp(tau H_ext) e_1`, or with
    `corrected=False` the plain one, `beta Q_k exp(tau H_k) e_1`. A one-chunk basis is
    read up to the smallest bucket holding `dim + 1` rows (`low`: a static lower
    bound on `dim + 1`); a chunked one chunk by chunk."""
    coeffs = jnp.where(coefficient_mask(coeffs.shape[0], dim, corrected), coeffs, 0)
    beta = decomp.beta.astype(coeffs.dtype)
    if len(decomp.basis) > 1:
        return beta * weighted_sum(decomp, coeffs, orth)
    (chunk,) = decomp.basis
    size = chunk.shape[0]

    def branch(b):
        def weighted(coeffs, chunk):
            return beta * (coeffs[:b] @ chunk[:b])

        return weighted

    return bucket_switch(dim + 1, size, branch, coeffs[:size], chunk, low=low)


def approximation(
    decomp: Decomposition,
    dim: jax.Array,
    tau: jax.Array,
    orth: Orthogonalisation,
    corrected: bool = True,
    low: int = 1,
    differentiable: bool = True,
) -> jax.Array:
    """The Krylov approximation of `exp(tau A) v` for dimension `dim`."""
    coeffs = exp_coefficients(decomp.hessenberg, dim, tau, low, differentiable)
    return combine(decomp, coeffs, dim, orth, corrected, low)


def coefficient_mask(size: int, dim: jax.Array, corrected: bool) -> jax.Array:
    """Which coefficients of `exp(tau H_ext) e_1` the approximation uses."""
    rows = jnp.arange(size)
    return rows <= dim if corrected else rows < dim


def exp_gram(
    adjoint: jax.Array,
    adjoint_dim: jax.Array,
    forward: jax.Array,
    forward_dim: jax.Array,
    forward_start: jax.Array,
    tau: jax.Array,
    low: int = 1,
) -> jax.Array:
    """`G = ∫_0^tau exp((tau - r) F̃) e_1 y_0^T exp(r F^T) dr` for the extended
    Hessenberg matrices `F̃ = adjoint` and `F = forward` (dimensions `adjoint_dim`,
    `forward_dim`; `(m + 1) x (m + 1)`, zero-padded) and the coefficient vector
    `y_0 = forward_start`.

    `G[a, b]` is the weight of the pair (adjoint basis vector `a`, forward basis vector
    `b`) in the integral of the product of the two projected solutions. It is the
    upper right block of the exponential of the block triangular matrix
    `tau [[F̃, e_1 y_0^T], [0, F^T]]` (Van Loan 1978, `expm_corner`), computed at the
    smallest bucket that holds both dimensions (`low`: a static lower bound on the
    larger dimension plus one). The coupling block is normalised
    first (G is linear in it), so that it does not inflate the scaling-and-squaring
    norm.
    """
    m1 = forward.shape[0]
    scale = jnp.max(jnp.abs(forward_start))
    unit = forward_start / jnp.where(scale > 0, scale, 1).astype(forward_start.dtype)
    tau = jnp.asarray(tau).astype(forward.dtype)

    def branch(b):
        def gram(adjoint, forward, unit):
            coupling = jnp.zeros((b, b), forward.dtype).at[0].set(unit[:b])
            corner = expm_corner(
                tau * adjoint[:b, :b], tau * coupling, tau * forward[:b, :b].T
            )
            return jnp.zeros((m1, m1), forward.dtype).at[:b, :b].set(corner)

        return gram

    needed = jnp.maximum(adjoint_dim, forward_dim) + 1
    gram = bucket_switch(needed, m1, branch, adjoint, forward, unit, low=low)
    return gram * scale.astype(gram.dtype)
