"""Test problems and independent references (SciPy dense exponentials)."""

import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.linalg


def laplacian_1d(n, scale=1.0):
    """Dirichlet 1-D Laplacian (symmetric negative definite)."""
    main = -2.0 * np.ones(n)
    off = np.ones(n - 1)
    return scale * (np.diag(main) + np.diag(off, 1) + np.diag(off, -1))


def convection_diffusion_1d(n, velocity=30.0, diffusion=1.0):
    """Upwind convection plus diffusion on (0, 1): non-symmetric and non-normal."""
    h = 1.0 / (n + 1)
    lap = laplacian_1d(n, diffusion / h**2)
    upwind = (np.eye(n) - np.diag(np.ones(n - 1), -1)) * (-velocity / h)
    return lap + upwind


def random_hermitian(n, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    return (b + b.conj().T) / (2 * np.sqrt(n))


def expm_ref(matrix, vector, t):
    return scipy.linalg.expm(t * np.asarray(matrix)) @ np.asarray(vector)


def phi_ref(matrix, vectors, t):
    """sum_j t^j phi_j(tA) b_j via the augmented-matrix identity (Al-Mohy & Higham)."""
    matrix = np.asarray(matrix)
    n = matrix.shape[0]
    p = len(vectors) - 1
    if p == 0:
        return expm_ref(matrix, vectors[0], t)
    w = np.stack([np.asarray(b) for b in vectors[:0:-1]], axis=1)
    augmented = np.zeros((n + p, n + p), dtype=np.result_type(matrix, w))
    augmented[:n, :n] = matrix
    augmented[:n, n:] = w
    augmented[n:, n:] = np.eye(p, k=1)
    start = np.concatenate([np.asarray(vectors[0]), np.eye(p)[-1]])
    return (scipy.linalg.expm(t * augmented) @ start)[:n]


def rel_err(a, b):
    """Relative 2-norm error; the absolute error where the reference is zero."""
    a, b = np.asarray(a), np.asarray(b)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (scale if scale > 0 else 1.0))


def tol(dtype):
    return 1e-8 if jnp.finfo(dtype).bits == 64 else 2e-4


def symmetric_op(matrix):
    return lx.MatrixLinearOperator(jnp.asarray(matrix), lx.symmetric_tag)
