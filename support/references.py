"""Independent references: dense SciPy matrix exponentials."""

import numpy as np
import scipy.linalg


def expm_ref(matrix, vector, t):
    """`exp(tA) v` by SciPy's dense `expm` (float64 or complex128)."""
    return scipy.linalg.expm(t * np.asarray(matrix)) @ np.asarray(vector)


def phi_ref(matrix, vectors, t):
    """`Σ_j t^j φ_j(tA) b_j` for `vectors = (b_0, ..., b_p)` by the augmented-matrix
    identity (Al-Mohy & Higham 2011, Theorem 2.1) and SciPy's dense `expm`."""
    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    p = len(vectors) - 1
    if p == 0:
        return expm_ref(matrix, vectors[0], t)
    w = np.stack([np.asarray(b) for b in vectors[:0:-1]], axis=1)
    dtype = np.result_type(matrix, w, np.asarray(vectors[0]))
    augmented = np.zeros((n + p, n + p), dtype=dtype)
    augmented[:n, :n] = matrix
    augmented[:n, n:] = w
    augmented[n:, n:] = np.eye(p, k=1)
    start = np.concatenate([np.asarray(vectors[0]), np.eye(p)[-1]]).astype(dtype)
    return (scipy.linalg.expm(t * augmented) @ start)[:n]


def periodic_convection_diffusion(n: int):
    """The periodic 1-D operator `κ Δ_h - c D_h` on `n` points of the unit interval
    (second-order central differences), as a matvec `matvec(theta, u)` with
    `theta = (κ, c)`, and its exact exponential `exact(theta, u, t)` through the
    discrete Fourier transform that diagonalises it (independent of any Krylov
    method, differentiable by JAX, cheap for any `n`)."""
    import jax.numpy as jnp

    def matvec(theta, u):
        kappa, c = theta
        laplacian = (jnp.roll(u, 1) + jnp.roll(u, -1) - 2 * u) * n**2
        derivative = (jnp.roll(u, -1) - jnp.roll(u, 1)) * n / 2
        return kappa * laplacian - c * derivative

    def exact(theta, u, t):
        kappa, c = theta
        angle = 2 * jnp.pi * jnp.fft.fftfreq(n)
        symbol = kappa * (2 * jnp.cos(angle) - 2) * n**2 - c * 1j * jnp.sin(angle) * n
        return jnp.real(jnp.fft.ifft(jnp.exp(t * symbol) * jnp.fft.fft(u)))

    return matvec, exact
