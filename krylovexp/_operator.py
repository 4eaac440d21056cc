"""Turning user input (Lineax operators or arrays, pytree vectors) into a matvec on
flat 1-D vectors, with trace-time validation."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jax.flatten_util import ravel_pytree


def as_operator(operator: Any) -> lx.AbstractLinearOperator:
    """Accept a Lineax operator or a square 2-D array; raise a clear error otherwise."""
    if isinstance(operator, lx.AbstractLinearOperator):
        op = operator
    elif eqx.is_array_like(operator):
        matrix = jnp.asarray(operator)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                "Expected a square 2-D array or a lineax.AbstractLinearOperator, got "
                f"an array of shape {matrix.shape}."
            )
        if not jnp.issubdtype(matrix.dtype, jnp.inexact):
            matrix = matrix.astype(jnp.result_type(float))
        op = lx.MatrixLinearOperator(matrix)
    else:
        raise ValueError(
            "Expected a lineax.AbstractLinearOperator or a square 2-D array, got "
            f"{type(operator).__name__}."
        )
    in_structure, out_structure = op.in_structure(), op.out_structure()
    if not _same_structure(in_structure, out_structure):
        raise ValueError(
            "The matrix exponential needs a square operator whose input and output "
            f"structures agree; got input structure {in_structure} and output "
            f"structure {out_structure}."
        )
    dtypes = {x.dtype for x in jtu.tree_leaves(in_structure)}
    if len(dtypes) != 1:
        raise ValueError(
            f"All leaves of the operator's input structure must share one dtype; got "
            f"{sorted(str(d) for d in dtypes)}."
        )
    return op


def _same_structure(a, b) -> bool:
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(
        x.shape == y.shape and x.dtype == y.dtype
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    )


def check_vector(operator: lx.AbstractLinearOperator, vector: Any, name: str) -> None:
    """The vector must match the operator's input structure exactly."""
    expected = operator.in_structure()
    try:
        got = jax.eval_shape(lambda: vector)
    except Exception as e:  # pragma: no cover - non-array leaves
        raise ValueError(f"`{name}` must be a pytree of arrays.") from e
    if not _same_structure(expected, got):
        raise ValueError(
            f"`{name}` must match the operator's input structure (same pytree, shapes "
            f"and dtypes); expected {expected}, got {got}. Cast the vector or the "
            "operator so that their dtypes agree."
        )


def operator_dtype(operator: lx.AbstractLinearOperator):
    return jtu.tree_leaves(operator.in_structure())[0].dtype


def operator_size(operator: lx.AbstractLinearOperator) -> int:
    return sum(x.size for x in jtu.tree_leaves(operator.in_structure()))


class AbstractSystem(eqx.Module):
    """A linear map on flat 1-D vectors, `x ↦ A(params) x`, whose arrays `params` are
    passed apart from the (static) map, so that tangents and cotangents reach them.
    The sweep, its substeps and the adjoints see operators only through this.
    Subclasses: `FlatSystem` (a user's operator), the augmented operator of `phimv`
    (`_expm._AugmentedSystem`), the transposed operator of the backward pass
    (`_backward._TransposedSystem`) and the block operator of forward mode
    (`_derivatives._PerturbationSystem`)."""

    @abc.abstractmethod
    def matvec(self, params, x):
        """`A(params) x` for a flat vector `x`."""


class FlatSystem(AbstractSystem):
    """An operator as `matvec(params, x)` on flat vectors. `params` (kept apart, see
    `flatten`) holds every floating-point array of the operator, fields and arrays
    closed over by its function alike, so that cotangents reach them."""

    static: Any
    unravel: Callable

    def matvec(self, params, x):
        operator = eqx.combine(params, self.static)
        flat, _ = ravel_pytree(operator.mv(self.unravel(x)))
        return flat


def flatten(operator: lx.AbstractLinearOperator) -> tuple[Any, FlatSystem]:
    """Split a (linearised) operator into its arrays and a flat matvec."""
    operator = lx.linearise(operator)
    params, static = eqx.partition(operator, eqx.is_inexact_array)
    example = jtu.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), operator.in_structure()
    )
    _, unravel = ravel_pytree(example)
    return params, FlatSystem(static, unravel)


def hermitian_tagged(operator: lx.AbstractLinearOperator) -> bool:
    """Whether Lineax's tags say the operator itself is Hermitian: as
    `lanczos_applicable`, but a scalar factor must be real (`-i H` has a tridiagonal
    projection that is skew-Hermitian, not Hermitian)."""
    if isinstance(operator, lx.NegLinearOperator):
        return hermitian_tagged(operator.operator)
    if isinstance(operator, (lx.MulLinearOperator, lx.DivLinearOperator)):
        scalar_complex = jnp.issubdtype(
            jnp.result_type(operator.scalar), jnp.complexfloating
        )
        return not scalar_complex and hermitian_tagged(operator.operator)
    return lanczos_applicable(operator)


def lanczos_applicable(operator: lx.AbstractLinearOperator) -> bool:
    """Whether Lineax's tags say the operator is Hermitian (real symmetric, or complex
    positive/negative semidefinite) up to a scalar factor, so that its projection onto
    a Krylov space is tridiagonal and Lanczos applies."""
    if isinstance(
        operator, (lx.MulLinearOperator, lx.DivLinearOperator, lx.NegLinearOperator)
    ):
        return lanczos_applicable(operator.operator)
    queries = (lx.is_positive_semidefinite, lx.is_negative_semidefinite)
    if not jnp.issubdtype(operator_dtype(operator), jnp.complexfloating):
        queries = (lx.is_symmetric,) + queries
    for query in queries:
        try:
            if query(operator):
                return True
        except NotImplementedError:
            pass
    return False
