"""Exact phi-functions of diagonal operators: `sum_j t^j phi_j(tD) b_j` elementwise,
without a Krylov sweep."""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Inexact, PyTree, Real

from ._operator import operator_dtype
from ._solution import RESULTS, Solution, error_if


# |z| below which phi_j(z) comes from its Taylor series (and above which from the
# closed form `phi_j = (phi_{j-1} - 1/(j-1)!) / z`). The forward recurrence loses
# about a factor `j! / |z|^j` to cancellation, the Taylor series of `phi_j` about
# `|z|^k / (k + j)!` at its largest term: 2 keeps both within a few ulps for the
# orders exponential integrators use (j <= 5).
_TAYLOR_RADIUS = 2.0


def is_diagonal_operator(operator: lx.AbstractLinearOperator) -> bool:
    """Whether the exact diagonal path applies: Lineax reports the operator diagonal.

    That covers `lineax.DiagonalLinearOperator` and `lineax.IdentityLinearOperator`,
    operators carrying `lineax.diagonal_tag` (a `MatrixLinearOperator` or
    `FunctionLinearOperator` so tagged is taken to be its diagonal, as Lineax's own
    solvers take it), 1×1 operators, and sums, products and scalings of those.
    """
    try:
        return bool(lx.is_diagonal(operator))
    except NotImplementedError:
        return False


def _taylor_terms(radius: float, order: int, dtype) -> int:
    """Terms of the Taylor series of `phi_order` that reach round-off at `radius`."""
    eps = float(jnp.finfo(dtype).eps)
    k = 1
    # Remainder of sum_k z^k / (k + order)! relative to phi_order(0) = 1 / order!.
    while radius**k * math.factorial(order) / math.factorial(k + order) > eps / 8:
        k += 1
    return k


def _phi_values(z: Array, p: int) -> Array:
    """`phi_0(z), ..., phi_p(z)` stacked on a leading axis, elementwise.

    Inside the disc `|z| < _TAYLOR_RADIUS`, `phi_p` is summed from its Taylor series
    (Horner) and the lower ones follow from `phi_j = z phi_{j+1} + 1/j!`, which damps
    errors there (`|z|` is small). Outside it, `phi_0 = exp(z)` and the closed form
    `phi_{j+1} = (phi_j - 1/j!) / z`, whose subtraction is benign for large `|z|`.
    Where `Re z` is so large that `exp(z)` would overflow while `phi_j` does not,
    `phi_j ≈ e^{z/2} z^{-j} e^{z/2}` (the polynomial part is negligible there).
    """
    dtype = z.dtype
    real = jnp.finfo(dtype).dtype
    radius = _TAYLOR_RADIUS
    small = jnp.abs(z) < radius
    z_small = jnp.where(small, z, 0)
    z_large = jnp.where(small, radius, z)

    # Small |z|: Taylor series of phi_p, then downwards.
    if p == 0:
        taylor = [jnp.exp(z_small)]
    else:
        num = _taylor_terms(radius, p, real)
        coeffs = [1.0 / math.factorial(k + p) for k in range(num)]
        acc = jnp.full_like(z_small, coeffs[-1])
        for c in coeffs[-2::-1]:
            acc = acc * z_small + c
        taylor = [acc]
        for j in range(p - 1, 0, -1):
            taylor.append(z_small * taylor[-1] + 1.0 / math.factorial(j))
        # phi_0 directly: the recurrence would cancel for z near -radius.
        taylor.append(jnp.exp(z_small))
        taylor = taylor[::-1]

    # Large |z|: closed form by the forward recurrence.
    closed = [jnp.exp(z_large)]
    inverse = 1 / z_large
    for j in range(p):
        closed.append((closed[-1] - 1.0 / math.factorial(j)) * inverse)
    if p > 0:
        # Where exp(z) would overflow: phi_j = (e^{z/2} / z^j) e^{z/2}, the
        # polynomial part being negligible (no rounding of a large exponent).
        huge = jnp.real(z_large) > 0.5 * math.log(float(jnp.finfo(real).max))
        z_huge = jnp.where(huge, z_large, 1)
        half = jnp.exp(0.5 * z_huge)
        inverse_huge = 1 / z_huge
        scaled = half
        for j in range(1, p + 1):
            scaled = scaled * inverse_huge
            closed[j] = jnp.where(huge, scaled * half, closed[j])

    pairs = zip(taylor, closed, strict=True)
    return jnp.stack([jnp.where(small, a, b) for a, b in pairs])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def phi_functions(z: Inexact[Array, "..."], p: int) -> Inexact[Array, "p+1 ..."]:
    """`phi_0(z), ..., phi_p(z)` elementwise, stacked on a new leading axis, for real
    or complex `z`, accurate to a few ulps for every `z` (no cancellation near 0, no
    overflow of `exp` where `phi_j` itself is finite).

    `phi_0 = exp` and `phi_{j+1}(z) = (phi_j(z) - 1/j!) / z`. Derivatives come from
    `phi_j' = phi_j - j phi_{j+1}` for small `|z|` (and where `exp(z)` dominates)
    and `phi_j' = (phi_{j-1} - j phi_j) / z` elsewhere; both are exact identities,
    each is used where it does not cancel, and they are again differentiable.
    """
    return _phi_values(z, p)


@phi_functions.defjvp
def _phi_functions_jvp(p, primals, tangents):
    (z,), (dz,) = primals, tangents
    values = phi_functions(z, p + 1)
    # `near` cancels for large |z| unless exp(z) dominates, `far` divides by z.
    real = jnp.finfo(z.dtype).dtype
    huge = jnp.real(z) > 0.5 * math.log(float(jnp.finfo(real).max))
    small = (jnp.abs(z) < _TAYLOR_RADIUS) | huge
    z_safe = jnp.where(small, 1, z)
    derivatives = [values[0]]
    for j in range(1, p + 1):
        near = values[j] - j * values[j + 1]
        far = (values[j - 1] - j * values[j]) / z_safe
        derivatives.append(jnp.where(small, near, far))
    return values[: p + 1], jnp.stack(derivatives) * dz


def _check_times(t: ArrayLike, real_dtype) -> tuple[Array, bool]:
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.complexfloating):
        raise ValueError(
            "`t` must be real; for exp(i t H) pass the operator `1j * H` instead."
        )
    if t.ndim > 1:
        raise ValueError(f"`t` must be a scalar or a 1-D array, got shape {t.shape}.")
    if t.ndim == 1 and t.shape[0] == 0:
        raise ValueError("`t` must not be an empty array.")
    return jnp.atleast_1d(t).astype(real_dtype), t.ndim == 0


def phi_coefficients(
    diagonal: Inexact[Array, " n"], times: Real[Array, " times"], p: int
) -> Inexact[Array, "times p+1 n"]:
    """`tau^j phi_j(tau d)` for every `tau` in `times` and `j = 0, ..., p`."""

    def at(tau):
        phis = phi_functions(tau.astype(diagonal.dtype) * diagonal, p)
        powers = jnp.stack([tau**j for j in range(p + 1)]).astype(diagonal.dtype)
        return powers[:, None] * phis

    return jax.vmap(at)(times)


def phi_combination(
    diagonal: Inexact[Array, " n"],
    vectors: tuple[Inexact[Array, " n"], ...],
    times: Real[Array, " times"],
) -> Inexact[Array, "times n"]:
    """`sum_j tau^j phi_j(tau d) b_j` for every `tau` in `times`, elementwise in the
    diagonal `d`; `vectors = (b_0, ..., b_p)`."""
    coefficients = phi_coefficients(diagonal, times, len(vectors) - 1)
    return jnp.einsum("tjn,jn->tn", coefficients, jnp.stack(vectors))


def diagonal_phimv(
    solver,
    operator: lx.AbstractLinearOperator,
    vectors: tuple[PyTree[ArrayLike], ...],
    t: Real[ArrayLike, ""] | Real[ArrayLike, " times"],
) -> Solution:
    """[`krylovexp.KrylovExpm.phimv`][] for an operator that
    `is_diagonal_operator` accepts: exact to round-off, O(n) per output time, no
    matvecs. `solver` supplies `throw` and the shape of the statistics. Forward and
    reverse mode both differentiate the exact formula (the `adjoint` field plays no
    part)."""
    dtype = operator_dtype(operator)
    real_dtype = jnp.finfo(dtype).dtype
    times, scalar = _check_times(t, real_dtype)
    diagonal = lx.diagonal(operator).astype(dtype)
    flats = [ravel_pytree(b)[0] for b in vectors]
    _, unravel = ravel_pytree(vectors[0])

    deltas = jnp.diff(times, prepend=jnp.zeros(1, real_dtype))
    monotone = jnp.all(deltas >= 0) | jnp.all(deltas <= 0)
    finite = jnp.all(jnp.isfinite(diagonal)) & jnp.all(jnp.isfinite(times))
    for b in flats:
        finite = finite & jnp.all(jnp.isfinite(b))
    outputs = phi_combination(diagonal, tuple(flats), times)
    outputs = jnp.where(finite & monotone, outputs, jnp.nan)
    result = RESULTS.where(
        ~finite,
        RESULTS.nonfinite_input,
        RESULTS.where(
            ~monotone,
            RESULTS.nonmonotone_times,
            RESULTS.where(
                jnp.all(jnp.isfinite(outputs)),
                RESULTS.successful,
                RESULTS.nonfinite_output,
            ),
        ),
    )
    result = jax.lax.stop_gradient(result)
    if solver.throw:
        outputs = error_if(outputs, result != RESULTS.successful, result)
    value = jax.vmap(unravel)(outputs)
    if scalar:
        value = jtu.tree_map(lambda x: x[0], value)
    stats = _no_krylov_stats(solver.max_substeps, real_dtype)
    return Solution(value=value, result=result, stats=stats)


# ---------------------------------------------------------------------------------
# Coefficients cached across the steps of an exponential integrator.


class PhiTable(eqx.Module):
    """`tau^j phi_j(tau D)`, `j = 0, ..., p`, of a diagonal operator `D` at the times
    `tau = step * scales` at which a fixed-step exponential integrator evaluates its
    phi-functions. Every step of the same size needs the same coefficients, so they
    are computed once and looked up (as exponax precomputes them per `dt`)."""

    step: Real[Array, ""]
    times: Real[Array, " k"]
    coefficients: Inexact[Array, "k p+1 n"]


def make_table(
    operator: lx.AbstractLinearOperator,
    step: Real[ArrayLike, ""],
    scales: tuple[float, ...],
    p: int,
) -> PhiTable:
    dtype = operator_dtype(operator)
    real_dtype = jnp.finfo(dtype).dtype
    step = jnp.asarray(step, real_dtype)
    times = step * jnp.asarray(scales, real_dtype)
    diagonal = lx.diagonal(operator).astype(dtype)
    return PhiTable(step, times, phi_coefficients(diagonal, times, p))


def table_phimv(
    table: PhiTable,
    rows: tuple[int, ...],
    vectors: tuple[PyTree[Array], ...],
    t: Real[ArrayLike, ""] | Real[ArrayLike, " times"],
    max_substeps: int,
) -> Solution:
    """`sum_j t^j phi_j(tD) b_j` with the coefficients of the table's rows `rows`
    (static), which the caller has matched to the times `t`. Elementwise
    multiply-adds with static indices only, so that XLA fuses them with whatever
    forms the vectors. Finiteness of the output is left to the caller."""
    times, scalar = _check_times(t, table.times.dtype)
    q = table.coefficients.shape[1]
    if times.shape[0] != len(rows) or len(vectors) > q:
        raise ValueError(
            f"A phi-table lookup for {times.shape[0]} times and {len(vectors)} "
            f"vectors does not fit rows {rows} of a table of order {q - 1}."
        )
    flats = [ravel_pytree(b)[0] for b in vectors]
    _, unravel = ravel_pytree(vectors[0])
    outputs = []
    for r in rows:
        row = table.coefficients[r]
        outputs.append(unravel(sum(row[j] * b for j, b in enumerate(flats))))
    # Stacked after unravelling, so that taking one time from the stack reduces to
    # that row's expression.
    value = jtu.tree_map(lambda *rows: jnp.stack(rows), *outputs)
    if scalar:
        value = outputs[0]
    return Solution(
        value=value,
        result=RESULTS.successful,
        stats=_no_krylov_stats(max_substeps, table.times.dtype),
    )


def _no_krylov_stats(max_substeps: int, real_dtype) -> dict[str, Array]:
    return {
        "num_matvecs": jnp.asarray(0),
        "num_substeps": jnp.asarray(0),
        "num_rejected": jnp.asarray(0),
        "max_krylov_dim": jnp.asarray(0, jnp.int32),
        "krylov_dims": jnp.zeros(max_substeps, jnp.int32),
        "error_estimate": jnp.zeros((), real_dtype),
        "growth_factor": jnp.ones((), real_dtype),
    }
