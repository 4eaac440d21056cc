"""`ExpmLinearOperator`: the matrix exponential as a Lineax operator."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, PyTree, Real

from ._expm import KrylovExpm
from ._operator import as_operator, operator_dtype


class ExpmLinearOperator(lx.AbstractLinearOperator):
    """The Lineax operator `x ↦ exp(tA) x`, applied matrix-free by
    [`krylovexp.KrylovExpm`][].

    It composes with other Lineax operators and solvers; e.g. running a diffusion
    backwards in time by solving `exp(tA) u0 = uT` with `lineax.GMRES`.
    Its transpose is `exp(tAᵀ)`; symmetry, diagonality and triangularity of `A` carry
    over, and the exponential of a Hermitian operator (real symmetric, or tagged
    positive or negative semidefinite) is positive definite. The exponential of a
    complex symmetric operator is complex symmetric, not Hermitian.

    **Arguments:**

    - `operator`: a square Lineax operator or 2-D array `A`.
    - `t`: a real scalar time.
    - `solver`: the [`krylovexp.KrylovExpm`][] configuration used by `mv`.
    """

    operator: lx.AbstractLinearOperator
    t: Real[Array, ""]
    solver: KrylovExpm

    def __init__(
        self,
        operator: lx.AbstractLinearOperator | ArrayLike,
        t: Real[ArrayLike, ""] = 1.0,
        solver: KrylovExpm = KrylovExpm(),
    ):
        self.operator = as_operator(operator)
        t = jnp.asarray(t)
        if t.ndim != 0 or jnp.issubdtype(t.dtype, jnp.complexfloating):
            raise ValueError(f"`t` must be a real scalar, got {t.dtype}{t.shape}.")
        self.t = t
        self.solver = solver

    def mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        return self.solver(self.operator, vector, self.t)

    def as_matrix(self) -> Array:
        structure = self.in_structure()
        example = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
        flat, unravel = ravel_pytree(example)
        eye = jnp.eye(flat.size, dtype=flat.dtype)
        columns = jax.vmap(lambda e: ravel_pytree(self.mv(unravel(e)))[0])(eye)
        return columns.T

    def transpose(self) -> "ExpmLinearOperator":
        return ExpmLinearOperator(self.operator.transpose(), self.t, self.solver)

    def in_structure(self) -> Any:
        return self.operator.in_structure()

    def out_structure(self) -> Any:
        return self.operator.out_structure()


def _delegate(query):
    @query.register(ExpmLinearOperator)
    def _(operator):
        return query(operator.operator)


for _query in (
    lx.is_symmetric,
    lx.is_diagonal,
    lx.is_lower_triangular,
    lx.is_upper_triangular,
):
    _delegate(_query)


@lx.linearise.register(ExpmLinearOperator)
def _(operator):
    return eqx.tree_at(lambda o: o.operator, operator, lx.linearise(operator.operator))


@lx.materialise.register(ExpmLinearOperator)
def _(operator):
    return lx.MatrixLinearOperator(operator.as_matrix())


@lx.diagonal.register(ExpmLinearOperator)
def _(operator):
    if lx.is_diagonal(operator.operator):
        return jnp.exp(operator.t * lx.diagonal(operator.operator))
    return jnp.diag(operator.as_matrix())


@lx.tridiagonal.register(ExpmLinearOperator)
def _(operator):
    matrix = operator.as_matrix()
    return jnp.diag(matrix), jnp.diag(matrix, -1), jnp.diag(matrix, 1)


@lx.is_tridiagonal.register(ExpmLinearOperator)
def _(operator):
    return lx.is_diagonal(operator.operator)


@lx.has_unit_diagonal.register(ExpmLinearOperator)
def _(operator):
    return False


@lx.is_positive_semidefinite.register(ExpmLinearOperator)
def _(operator):
    # exp(tA) of a Hermitian A is Hermitian positive definite. For a complex operator
    # "symmetric" means A = Aᵀ, not Hermitian, and exp(tA) is then complex symmetric
    # but not Hermitian: only the semidefinite tags (Hermitian in Lineax) count.
    inner = operator.operator
    real = not jnp.issubdtype(operator_dtype(inner), jnp.complexfloating)
    return (
        (real and lx.is_symmetric(inner))
        or lx.is_positive_semidefinite(inner)
        or lx.is_negative_semidefinite(inner)
    )


@lx.is_negative_semidefinite.register(ExpmLinearOperator)
def _(operator):
    return False


@lx.conj.register(ExpmLinearOperator)
def _(operator):
    return ExpmLinearOperator(lx.conj(operator.operator), operator.t, operator.solver)
