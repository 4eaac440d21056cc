"""Benchmark problems.

Two stiff linear PDE operators on the unit square, discretised on an `n × n` interior
grid with homogeneous Dirichlet boundaries (`h = 1/(n+1)`), applied matrix-free with
array slicing (no dense or sparse matrix on the JAX side):

- **heat** (problem A): `A(κ) u = κ Δ_h u`, the 5-point Laplacian scaled by the
  diffusion coefficient `κ`. Symmetric negative definite; tagged
  `lineax.symmetric_tag`.
- **advection–diffusion** (problem B): `A(c) u = ν Δ_h u − c_x ∂_x u − c_y ∂_y u`
  with central differences for the advection. With cell Péclet number
  `|c| h / (2ν) < 1` the spectrum is real and negative (the operator is diagonally
  similar to a symmetric one) but the similarity transform is badly conditioned: the
  operator is strongly non-normal.

Each builder takes the parameter `θ` (κ, or the velocity `c`) as a JAX array so that
gradients can flow through it. Vectors are flat arrays of length `n²` (row-major,
axis 0 = x). `Problem.sparse` gives the same operator as a SciPy CSR matrix, for
references.

And one problem for gradients with a parameter per grid node,
`VariableDiffusionProblem`: `u_t = ∂x(e^θ(x) ∂x u)` in 1-D.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import scipy.sparse as sp

from .operators import laplacian_1d, variable_diffusion_1d


def grid(n: int):
    """Interior grid points `x_i = i h`, `i = 1..n`, `h = 1/(n+1)`."""
    h = 1.0 / (n + 1)
    x = h * np.arange(1, n + 1)
    return h, x


def laplacian_2d(u, h):
    """5-point Laplacian of a 2-D array `u` with zero Dirichlet boundary values."""
    up = jnp.pad(u, 1)
    return (
        up[2:, 1:-1] + up[:-2, 1:-1] + up[1:-1, 2:] + up[1:-1, :-2] - 4.0 * u
    ) / h**2


def central_gradient_2d(u, h):
    """Central differences `(∂_x u, ∂_y u)` with zero Dirichlet boundary values."""
    up = jnp.pad(u, 1)
    ux = (up[2:, 1:-1] - up[:-2, 1:-1]) / (2.0 * h)
    uy = (up[1:-1, 2:] - up[1:-1, :-2]) / (2.0 * h)
    return ux, uy


def heat_matvec(n: int) -> Callable:
    """`(v, κ) ↦ κ Δ_h v` on flat vectors of length `n²`."""
    h, _ = grid(n)

    def matvec(v, kappa):
        u = v.reshape(n, n)
        return (kappa * laplacian_2d(u, h)).reshape(-1)

    return matvec


def advdiff_matvec(n: int, nu: float) -> Callable:
    """`(v, c) ↦ ν Δ_h v − c·∇_h v` on flat vectors of length `n²`; `c` = (c_x, c_y)."""
    h, _ = grid(n)

    def matvec(v, c):
        u = v.reshape(n, n)
        ux, uy = central_gradient_2d(u, h)
        return (nu * laplacian_2d(u, h) - c[0] * ux - c[1] * uy).reshape(-1)

    return matvec


def _second_difference_1d(n, h):
    return sp.csr_matrix(laplacian_1d(n, 1.0 / h**2))


def _first_difference_1d(n, h):
    e = np.ones(n - 1)
    return sp.diags([-e, e], [-1, 1]) / (2 * h)


def heat_sparse(n: int, kappa: float):
    h, _ = grid(n)
    d2 = _second_difference_1d(n, h)
    eye = sp.identity(n)
    return (kappa * (sp.kron(d2, eye) + sp.kron(eye, d2))).tocsr()


def advdiff_sparse(n: int, nu: float, c):
    h, _ = grid(n)
    d2 = _second_difference_1d(n, h)
    d1 = _first_difference_1d(n, h)
    eye = sp.identity(n)
    lap = sp.kron(d2, eye) + sp.kron(eye, d2)
    adv = float(c[0]) * sp.kron(d1, eye) + float(c[1]) * sp.kron(eye, d1)
    return (nu * lap - adv).tocsr()


def gaussian_bump(n: int, centre=(0.5, 0.5), width=0.1):
    """`exp(−|x − centre|² / (2 width²))` on the interior grid, flattened."""
    _, x = grid(n)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    r2 = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2
    return np.exp(-r2 / (2 * width**2)).reshape(-1)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A linear problem `u(T) = exp(T A(θ)) u0`.

    - `matvec(v, θ)`: matrix-free action of `A(θ)` (JAX).
    - `operator(θ)`: the same as a `lineax.FunctionLinearOperator` (symmetric-tagged
      where `symmetric`).
    - `sparse(θ)`: SciPy CSR matrix of `A(θ)` (NumPy θ).
    """

    name: str
    description: str
    n: int
    T: float
    theta: np.ndarray
    u0: np.ndarray
    matvec: Callable
    sparse: Callable
    symmetric: bool

    def operator(self, theta):
        structure = jnp.zeros(self.n * self.n, dtype=self.u0.dtype)
        tags = lx.symmetric_tag if self.symmetric else ()
        return lx.FunctionLinearOperator(
            lambda v: self.matvec(v, theta), structure, tags=tags
        )


def heat_problem(n: int = 128, T: float = 0.01, kappa: float = 1.0) -> Problem:
    """Problem A: stiff 2-D heat equation, `‖TA‖₂ ≈ 8κT(n+1)²` (1.33e3 for n = 128)."""
    return Problem(
        name="A",
        description=(
            f"2-D heat, 5-pt Laplacian, Dirichlet, {n}x{n}, kappa={kappa}, T={T}"
        ),
        n=n,
        T=T,
        theta=np.asarray(kappa, dtype=np.float64),
        u0=gaussian_bump(n),
        matvec=heat_matvec(n),
        sparse=lambda theta: heat_sparse(n, float(theta)),
        symmetric=True,
    )


def advdiff_problem(
    n: int = 128, T: float = 0.01, nu: float = 1.0, velocity=(60.0, 30.0)
) -> Problem:
    """Problem B: non-symmetric 2-D advection–diffusion, central differences.

    Default velocity (60, 30) with ν = 1: global Péclet number |c|/ν ≈ 67, cell Péclet
    number |c| h/(2ν) ≈ 0.26 (real spectrum, no wiggles). The operator is diagonally
    similar to a symmetric one through `D = diag(exp(c·x / (2ν)))`, whose condition
    number `exp((|c_x| + |c_y|)(1 − 2h)/(2ν)) ≈ 1e19` measures the non-normality
    (Reddy & Trefethen 1994). The bump starts at (0.3, 0.35) and is advected by
    `c T = (0.6, 0.3)` into the outflow boundary layer.
    """
    velocity = np.asarray(velocity, dtype=np.float64)
    return Problem(
        name="B",
        description=(
            f"2-D advection-diffusion, central, Dirichlet, {n}x{n}, nu={nu}, "
            f"c=({velocity[0]:g},{velocity[1]:g}), T={T}"
        ),
        n=n,
        T=T,
        theta=velocity,
        u0=gaussian_bump(n, centre=(0.3, 0.35)),
        matvec=advdiff_matvec(n, nu),
        sparse=lambda theta: advdiff_sparse(n, nu, np.asarray(theta)),
        symmetric=False,
    )


PROBLEMS = {"A": heat_problem, "B": advdiff_problem}


@dataclasses.dataclass(frozen=True)
class VariableDiffusionProblem:
    """`u(T) = exp(T A(θ)) u0` for the 1-D variable diffusion `A(θ) u = ∂x(e^θ ∂x u)`
    (`support.operators.variable_diffusion_1d`) on n nodes of (0, 1), Dirichlet ends,
    one parameter per node, observed at every fourth node:
    `loss(θ) = Σ u(T)[::4]²`.

    - `operator(θ)`: a symmetric-tagged `lineax.FunctionLinearOperator`.
    - `matrix(θ)`: the dense matrix (JAX, differentiable), for references.
    """

    n: int
    T: float
    h: float
    x: jax.Array
    theta: jax.Array
    u0: jax.Array

    def apply(self, theta, u):
        return variable_diffusion_1d(theta, u, self.h)

    def operator(self, theta):
        structure = jax.ShapeDtypeStruct((self.n,), self.u0.dtype)
        return lx.FunctionLinearOperator(
            lambda u: self.apply(theta, u), structure, lx.symmetric_tag
        )

    def matrix(self, theta):
        eye = jnp.eye(self.n, dtype=self.u0.dtype)
        return jax.vmap(lambda e: self.apply(theta, e), out_axes=1)(eye)

    @staticmethod
    def observe(u):
        return jnp.sum(u[::4] ** 2)


def variable_diffusion_problem(n: int = 200, T: float = 0.002):
    """`θ(x) = 0.3 sin 3x + 0.1 cos 7x`, `u0` two Gaussian bumps (at 0.4 and 0.7).
    `‖TA‖₂ ≈ 430` for n = 200, T = 0.002."""
    h = 1.0 / (n + 1)
    x = jnp.linspace(h, 1 - h, n)
    return VariableDiffusionProblem(
        n=n,
        T=T,
        h=h,
        x=x,
        theta=0.3 * jnp.sin(3 * x) + 0.1 * jnp.cos(7 * x),
        u0=jnp.exp(-50 * (x - 0.4) ** 2) + 0.5 * jnp.exp(-80 * (x - 0.7) ** 2),
    )
