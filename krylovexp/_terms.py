"""The linear term `L y dt` of a semilinear problem `y' = L y + N(t, y, args)`."""

from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree, Real


class LinearTerm(diffrax.AbstractTerm):
    r"""The linear part `L y dt` of a differential equation, for Diffrax.

    Use it alone for a linear problem `y' = L y` (solved exactly by
    [`krylovexp.LinearExponential`][]), or as the first term of
    `diffrax.MultiTerm(LinearTerm(L), diffrax.ODETerm(N))` for a semilinear problem
    `y' = L y + N(t, y, args)` (solved by [`krylovexp.ExponentialEuler`][],
    [`krylovexp.ETDRK2`][], [`krylovexp.ETDRK4`][], [`krylovexp.Exprb32`][],
    [`krylovexp.Exprb43`][]).

    `L` must not depend on `t` (put time-dependent parts into `N`). It may depend on
    `args`, so that it can hold parameters that are learned through the solve.

    As an ordinary Diffrax term its vector field is `L y`, so the same terms also work
    with Diffrax's own solvers (`diffrax.Tsit5()` on the `MultiTerm`, or
    `diffrax.KenCarp4()` on `MultiTerm(ODETerm(N), LinearTerm(L))` with `L` implicit).

    **Arguments:**

    - `operator`: a square `lineax.AbstractLinearOperator` whose input and output
        structures are those of the state `y`; or a square 2-D array (for a 1-D state);
        or a callable `args -> lineax.AbstractLinearOperator` (or `args -> array`),
        called with the `args` of `diffrax.diffeqsolve` whenever the operator is needed.
    """

    operator: lx.AbstractLinearOperator | Callable[[Any], Any]

    def __init__(
        self,
        operator: lx.AbstractLinearOperator
        | Real[ArrayLike, "n n"]
        | Callable[[PyTree[Any]], lx.AbstractLinearOperator | Array],
    ):
        if isinstance(operator, lx.AbstractLinearOperator) or callable(operator):
            self.operator = operator
        else:
            matrix = jnp.asarray(operator)
            if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
                raise ValueError(
                    "`LinearTerm(operator)` needs a lineax operator, a square 2-D "
                    "array, or a function `args -> operator`; got an array of shape "
                    f"{matrix.shape}."
                )
            self.operator = lx.MatrixLinearOperator(matrix)

    def make_operator(self, args: PyTree[Any]) -> lx.AbstractLinearOperator:
        """The linear operator `L` for the given `args`.

        **Arguments:**

        - `args`: the `args` passed to `diffrax.diffeqsolve`.

        **Returns:**

        A square `lineax.AbstractLinearOperator`.
        """
        if isinstance(self.operator, lx.AbstractLinearOperator):
            return self.operator
        operator = self.operator(args)
        if isinstance(operator, lx.AbstractLinearOperator):
            return operator
        matrix = jnp.asarray(operator)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                "The function given to `LinearTerm` must return a lineax operator or "
                f"a square 2-D array; it returned an array of shape {matrix.shape}."
            )
        return lx.MatrixLinearOperator(matrix)

    def vf(self, t: Real[ArrayLike, ""], y: PyTree[Array], args: PyTree[Any]):
        del t
        operator = self.make_operator(args)
        return operator.mv(y)

    def contr(self, t0: Real[ArrayLike, ""], t1: Real[ArrayLike, ""], **kwargs):
        del kwargs
        return t1 - t0

    def prod(self, vf: PyTree[Array], control: Real[ArrayLike, ""]) -> PyTree[Array]:
        with jax.numpy_dtype_promotion("standard"):
            return jtu.tree_map(lambda v: control * v, vf)
