"""Result codes, the solution object, and the run-time check that raises them."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, PyTree


class RESULTS(eqx.Enumeration):
    """Result codes of a Krylov matrix-function evaluation."""

    successful = ""
    max_substeps_reached = (
        "The substep budget `max_substeps` ran out before the final time was reached. "
        "Increase `max_substeps` or `max_krylov_dim`, or loosen `rtol`/`atol`."
    )
    tolerance_not_met = (
        "A substep could not meet the requested tolerance even after shrinking its "
        "step size repeatedly; the result may be inaccurate."
    )
    error_amplified = (
        "Every substep met the tolerance, but the operator amplifies errors made early "
        "in the interval so strongly (stats['growth_factor'] * rtol >= 1) that not "
        "even the first digit of the result can be vouched for. This happens for "
        "strongly non-normal operators (Pascal- or Jordan-type transient growth) "
        "split into many substeps; a larger `max_krylov_dim` (fewer substeps) or a "
        "shorter time helps."
    )
    nonfinite_input = (
        "The vector, the operator's parameters or the times contain NaN or inf."
    )
    nonfinite_output = (
        "The result is not finite: the operator's exponential overflows for this t, "
        "or the operator produces NaN/inf."
    )
    nonmonotone_times = (
        "The output times must be monotone from 0: all of one sign and sorted by "
        "magnitude (for example [0.1, 0.2, 0.5] or [-0.1, -0.3])."
    )


class Solution(eqx.Module):
    """The output of [`krylovexp.KrylovExpm`][].

    **Attributes:**

    - `value`: the result, with the structure and dtype of the input vector (and a
        leading time axis when `t` is a 1-D array).
    - `result`: a [`krylovexp.RESULTS`][] code; `RESULTS.successful` when all went well.
    - `stats`: a dictionary with `num_matvecs` (operator applications in the forward
        evaluation), `num_substeps`, `num_rejected` (step-size reductions; each one
        reuses the Krylov basis and costs no matvec), `max_krylov_dim` (largest Krylov
        dimension used), `krylov_dims` (per substep, zero past `num_substeps`),
        `error_estimate` (sum of the local a-posteriori error estimates, an estimate of
        the absolute 2-norm error) and `growth_factor` (at least 1: an estimate of how
        much the operator amplifies errors made in earlier substeps by the end of the
        interval, relative to `atol + rtol max(|v|, |value|)`; about 1 for normal and
        dissipative operators, large for strongly non-normal ones, where the achieved
        error can exceed the tolerance by up to this factor although every substep met
        its own; once `growth_factor * rtol >= 1` the result is
        `RESULTS.error_amplified`).
    """

    value: PyTree[Array]
    result: RESULTS
    stats: dict[str, Array]


def error_if(tree: PyTree[Array], pred: Bool[Array, ""], error) -> PyTree[Array]:
    """`eqx.error_if(tree, pred, error)` for a message `error`, or
    `error.error_if(tree, pred)` for a [`krylovexp.RESULTS`][] value, with the check
    threaded through a scalar.

    `error_if` passes its argument through a `lax.cond` whose failing branch is a host
    callback, and XLA places the callback's output on one device: a state sharded
    over several devices would be gathered whole onto every device on every call,
    failing or not. The check runs on a zero scalar instead, which is added to every
    leaf (the sum is the leaf; NaN and inf stay as they are)."""
    zero = jnp.zeros(())
    if isinstance(error, str):
        zero = eqx.error_if(zero, pred, error)
    else:
        zero = error.error_if(zero, pred)
    return jtu.tree_map(lambda x: x + zero.astype(x.dtype), tree)
