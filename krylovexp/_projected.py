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

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from ._arnoldi import Decomposition, bucket_switch


def exp_coefficients(hessenberg: jax.Array, dim: jax.Array, tau: jax.Array):
    """First column of `exp(tau H_ext)` for Krylov dimension `dim`, padded to `m + 1`.

    Entries past `dim` are zero; entry `dim` is the error-estimate term.
    """
    m1, m = hessenberg.shape
    rows = jnp.arange(m1)[:, None]
    cols = jnp.arange(m)[None, :]
    masked = jnp.where((rows <= dim) & (cols < dim), hessenberg, 0)
    extended = jnp.zeros((m1, m1), hessenberg.dtype).at[:, :m].set(masked)
    extended = extended * jnp.asarray(tau).astype(hessenberg.dtype)

    def branch(b):
        def first_column(matrix):
            column = jsl.expm(matrix[:b, :b])[:, 0]
            return jnp.zeros(m1, matrix.dtype).at[:b].set(column)

        return first_column

    return bucket_switch(dim + 1, m1, branch, extended)


def approximation(decomp: Decomposition, dim: jax.Array, tau: jax.Array):
    """The corrected Krylov approximation of `exp(tau A) v` and its error estimate."""
    coeffs = exp_coefficients(decomp.hessenberg, dim, tau)
    beta = decomp.beta.astype(coeffs.dtype)
    rows = jnp.arange(coeffs.shape[0])
    coeffs = jnp.where(rows <= dim, coeffs, 0)
    value = beta * (coeffs @ decomp.basis)
    estimate = decomp.beta * jnp.abs(coeffs[dim])
    return value, estimate
