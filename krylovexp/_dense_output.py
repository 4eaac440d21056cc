"""Dense output of the exponential integrators: the cubic through the step's end
points and the continuous extension at two interior nodes.
"""

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree, Real


# Interior nodes of the continuous extension kept for dense output.
_NODES = (1.0 / 3.0, 2.0 / 3.0)


def _lagrange_to_monomial() -> np.ndarray:
    nodes = np.array((0.0,) + _NODES + (1.0,))
    vandermonde = np.vander(nodes, increasing=False)  # rows: [θ³, θ², θ, 1]
    return np.linalg.inv(vandermonde)


_LAGRANGE = _lagrange_to_monomial()


class ExponentialInterpolation(diffrax.AbstractLocalInterpolation):
    """Dense output of the krylovexp solvers.

    Each step evaluates its continuous extension (the exact solution of the linear or
    linearised problem with the step's polynomial approximation of the nonlinearity,
    `sum_j (θh)^j phi_j(θhA) b_j`) at `θ = 1/3, 2/3` in the same Krylov sweep that gives
    the end point; this class interpolates the cubic through `θ = 0, 1/3, 2/3, 1`.
    The values at the nodes are those of the continuous extension; in between the
    local error is `O(h⁴)` times the fourth time derivative of the solution.
    """

    t0: Real[Array, ""]
    t1: Real[Array, ""]
    coeffs: PyTree[Array]

    def __init__(
        self,
        *,
        t0: Real[ArrayLike, ""],
        t1: Real[ArrayLike, ""],
        y0: PyTree[Array],
        y1: PyTree[Array],
        ym: PyTree[Array],
    ):
        def _coeffs(a, m, b):
            values = jnp.concatenate([a[None], m, b[None]])
            matrix = jnp.asarray(_LAGRANGE, dtype=jnp.result_type(values.dtype, float))
            out = jnp.tensordot(matrix, values, axes=1)
            return out.astype(values.dtype)

        self.t0 = jnp.asarray(t0)
        self.t1 = jnp.asarray(t1)
        self.coeffs = jtu.tree_map(_coeffs, y0, ym, y1)

    def evaluate(
        self,
        t0: Real[ArrayLike, ""],
        t1: Real[ArrayLike, ""] | None = None,
        left: bool = True,
    ) -> PyTree[Array]:
        del left
        if t1 is not None:
            return jtu.tree_map(
                lambda a, b: a - b, self.evaluate(t1), self.evaluate(t0)
            )
        span = self.t1 - self.t0
        theta = (t0 - self.t0) / jnp.where(span == 0, 1, span)

        def _eval(c):
            with jax.numpy_dtype_promotion("standard"):
                return jnp.polyval(c, theta.astype(c.dtype))

        return jtu.tree_map(_eval, self.coeffs)
