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

from ._arnoldi import Decomposition, Orthogonalisation, bucket_switch, weighted_sum


# Taylor polynomial of degree 18, evaluated by Paterson–Stockmeyer in powers of A^4.
_DEGREE = 18
_TAYLOR = np.array([1.0 / math.factorial(k) for k in range(_DEGREE + 1)] + [0.0])
# With ||A||_1 <= 1 the truncation error is below sum_{k>18} 1/k! ~ 8e-18, under the
# unit roundoff of double precision relative to ||exp(A)|| >= 1/e.
_THETA = 1.0
_MAX_SQUARINGS = 40


def _scaled_taylor_exp(parts, mul, identity, norm):
    """Scaling and squaring of the degree-18 Taylor polynomial for a matrix given as
    a tuple of blocks with its own product `mul` (so that structure is kept)."""
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

    def square(i, r):
        return lax.cond(i < squarings, lambda r: mul(r, r), lambda r: r, r)

    result = lax.fori_loop(0, _MAX_SQUARINGS, square, result)
    return tuple(jnp.where(squarings <= _MAX_SQUARINGS, x, jnp.nan) for x in result)


def expm_small(matrix: jax.Array) -> jax.Array:
    """Dense exponential of a small matrix by scaling and squaring a degree-18 Taylor
    polynomial (Paterson–Stockmeyer: 7 matrix products, no linear solve, so no LAPACK
    call and no BLAS thread pool; cf. Al-Mohy & Higham 2009, Sastre et al. 2019).
    A fixed-length squaring scan keeps it cheap to compile and reverse-differentiable.
    Returns NaN if the norm is beyond 2^40."""
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    norm = jnp.max(jnp.sum(jnp.abs(matrix), axis=0))
    (result,) = _scaled_taylor_exp((matrix,), lambda a, b: (a[0] @ b[0],), (eye,), norm)
    return result


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
    return _scaled_taylor_exp((left, coupling, right), mul, identity, columns)[1]


def extended_hessenberg(hessenberg: jax.Array, dim: jax.Array) -> jax.Array:
    """`H_ext` of Krylov dimension `dim`, zero-padded to `(m + 1) x (m + 1)`."""
    m1, m = hessenberg.shape
    rows = jnp.arange(m1)[:, None]
    cols = jnp.arange(m)[None, :]
    masked = jnp.where((rows <= dim) & (cols < dim), hessenberg, 0)
    return jnp.zeros((m1, m1), hessenberg.dtype).at[:, :m].set(masked)


def exp_coefficients(
    hessenberg: jax.Array, dim: jax.Array, tau: jax.Array, low: int = 1
) -> jax.Array:
    """First column of `exp(tau H_ext)` for Krylov dimension `dim`, padded to `m + 1`.

    Entries past `dim` are zero; entry `dim` is the error-estimate term. The
    exponential is taken at the smallest bucket holding `dim + 1` rows (O(b³) work);
    `low` is a static lower bound on `dim + 1`.
    """
    m1, _ = hessenberg.shape
    extended = extended_hessenberg(hessenberg, dim)
    extended = extended * jnp.asarray(tau).astype(hessenberg.dtype)

    def branch(b):
        def first_column(matrix):
            column = expm_small(matrix[:b, :b])[:, 0]
            return jnp.zeros(m1, matrix.dtype).at[:b].set(column)

        return first_column

    return bucket_switch(dim + 1, m1, branch, extended, low=low)


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
) -> jax.Array:
    """The Krylov approximation of `exp(tau A) v` for dimension `dim`."""
    coeffs = exp_coefficients(decomp.hessenberg, dim, tau, low)
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
