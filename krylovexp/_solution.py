"""Result codes and the solution object."""

import equinox as eqx
from jaxtyping import Array, PyTree


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
        dimension used), `krylov_dims` (per substep, zero past `num_substeps`) and
        `error_estimate` (sum of the local a-posteriori error estimates, an estimate of
        the absolute 2-norm error).
    """

    value: PyTree[Array]
    result: RESULTS
    stats: dict[str, Array]
