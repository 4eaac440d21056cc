"""Small test operators: dense NumPy matrices and a matrix-free variable diffusion."""

import jax.numpy as jnp
import numpy as np


def laplacian_1d(n: int, scale: float = 1.0) -> np.ndarray:
    """`scale` times the Dirichlet second difference `tridiag(1, −2, 1)` of size n
    (symmetric negative definite); `scale = 1/h²` gives the 1-D Laplacian on a grid of
    spacing h."""
    main = -2.0 * np.ones(n)
    off = np.ones(n - 1)
    return scale * (np.diag(main) + np.diag(off, 1) + np.diag(off, -1))


def convection_diffusion_1d(
    n: int, velocity: float = 30.0, diffusion: float = 1.0
) -> np.ndarray:
    """Upwind convection plus diffusion on (0, 1), Dirichlet: non-symmetric and
    non-normal."""
    h = 1.0 / (n + 1)
    lap = laplacian_1d(n, diffusion / h**2)
    upwind = (np.eye(n) - np.diag(np.ones(n - 1), -1)) * (-velocity / h)
    return lap + upwind


def random_hermitian(n: int, seed: int = 0) -> np.ndarray:
    """A random complex Hermitian matrix with entries of size about `1/sqrt(n)`."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    return (b + b.conj().T) / (2 * np.sqrt(n))


def variable_diffusion_1d(theta, u, h):
    """`∂x(e^θ ∂x u)` on n nodes with homogeneous Dirichlet ends: one parameter per
    node, face coefficients the mean of the two neighbouring nodes (the end faces
    repeat the end nodes). Symmetric negative definite in `u`."""
    kappa = jnp.exp(jnp.concatenate([theta[:1], theta, theta[-1:]]))
    faces = 0.5 * (kappa[1:] + kappa[:-1])
    padded = jnp.concatenate([jnp.zeros(1, u.dtype), u, jnp.zeros(1, u.dtype)])
    flux = faces * (padded[1:] - padded[:-1]) / h
    return (flux[1:] - flux[:-1]) / h
