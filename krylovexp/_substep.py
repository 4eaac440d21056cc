"""One adaptive substep of the sweep: a Krylov basis of the operator grows from the
substep's start vector until the error estimate meets the tolerance, and the step
is shortened on the same basis when the largest dimension does not suffice."""

from typing import Any, NamedTuple

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from . import _arnoldi as arnoldi, _batching as batching
from ._config import _Config
from ._projected import approximation, checked_coefficients, combine, error_estimate


_MAX_REJECTIONS = 40
# Bases up to this size grow in one buffer; larger ones in chunks of growing size.
_ONE_BUFFER_BYTES = 2**20


# An error check costs a small exponential, about 0.1 ms on a CPU core whatever the
# operator; a Krylov step on a vector of up to this many bytes costs a fraction of
# that, so such bases grow by at least `_CHEAP_STRIDE` vectors between checks.
_CHEAP_VECTOR_BYTES = 2**16
_CHEAP_STRIDE = 4


def check_stride(w) -> int:
    """The least number of Krylov steps between two error checks. Static."""
    small = w.size * w.dtype.itemsize <= _CHEAP_VECTOR_BYTES
    return _CHEAP_STRIDE if small else 1


def one_buffer(max_dim: int, w) -> bool:
    """Whether a basis of `max_dim + 1` rows like `w` grows in one buffer (small
    problems) rather than in chunks. Static."""
    return (max_dim + 1) * w.size * w.dtype.itemsize <= _ONE_BUFFER_BYTES


class _Substep(NamedTuple):
    value: Array  # the approximation at the end of the substep
    hessenberg: Array  # (max_dim + 1, max_dim)
    beta: Array
    dim: Array
    tau: Array  # signed step taken (differentiable through the end time)
    ends: Array  # whether it reaches the segment's end time
    accepted: Array
    rejections: Array
    next_try: Array  # suggested magnitude of the next step
    estimate: Array
    propagator_norm: Array  # ||exp(tau H_k)||_2, see `checked_coefficients`
    basis: Any  # the basis buffer, when the substep grew in a given buffer
    extra: Any  # what the `finish` hook returned, or None


class _Growth(NamedTuple):
    """The state of a growing Krylov space between error checks."""

    dim: Array
    met: Array  # the estimate meets the tolerance (at a trusted dimension)
    broken: Array  # the space is invariant: no further vector
    coeffs: Array  # first column of exp(tau H_ext) at the last check
    err: Array
    norm: Array  # ||exp(tau H_k)||_2 at the last check
    next_check: Array
    last_dim: Array
    last_log_ratio: Array


def _next_check(dim, log_ratio, last_dim, last_log_ratio, max_dim, stride=1):
    """Where to evaluate the error estimate next while the basis grows.

    The log error ratio is extrapolated linearly from the last two checks; convergence
    is superlinear, so this overestimates the dimension needed and we go 80% of the
    way. Without a usable trend (no earlier check, or no decrease yet), the dimension
    grows geometrically by 1.25. Either way at most by 1.5× (or `stride`, the least
    step between checks, `check_stride`): few small exponentials, and never many more
    basis vectors than needed.
    """
    geometric = jnp.maximum(dim + stride, jnp.round(1.25 * dim).astype(dim.dtype))
    rate = (last_log_ratio - log_ratio) / jnp.maximum(dim - last_dim, 1)
    usable = (last_dim > 0) & (rate > 0) & jnp.isfinite(rate) & jnp.isfinite(log_ratio)
    ahead = jnp.ceil(0.8 * log_ratio / jnp.where(usable, rate, 1.0))
    ahead = jnp.where(usable & jnp.isfinite(ahead), ahead, 0).astype(dim.dtype)
    longest = jnp.maximum(geometric, jnp.ceil(1.5 * dim).astype(dim.dtype))
    predicted = jnp.clip(dim + ahead, dim + stride, longest)
    return jnp.minimum(jnp.where(usable, predicted, geometric), max_dim)


def _local_order(tau, err, last_tau, last_err, dim):
    """The exponent `q` of `err ∝ tau^q` with which a substep shortens its step.

    For small steps the error of a Krylov space of dimension `k` behaves like
    `tau^(k+1)`, but a step far too long for the space is in the regime where the
    error falls much more slowly (like `exp(-k² / (c tau ||A||))`): there `1 / k`
    shrinks the step by a few per cent per trial, and every trial is a small
    exponential of the largest size. After the first trial the exponent is measured
    from the last two (step, estimate) pairs instead, clipped to `[1, k]`; it grows
    as the step shrinks, so the measured one errs towards a shorter step."""
    slope = jnp.log(last_err / err) / jnp.log(last_tau / tau)
    usable = jnp.isfinite(slope) & (slope > 0) & (last_tau > tau)
    dim = jnp.maximum(dim, 1).astype(tau.dtype)
    return jnp.where(usable, jnp.clip(slope, 1.0, dim), dim)


def _substep(
    system,
    params,
    w,
    tau_try,
    remaining,
    tol_per_time,
    config: _Config,
    buffer=None,
    finish=None,
    min_capacity=None,
):
    """One adaptive substep from `w` (see `KrylovExpm`): grow the basis, then shrink
    the step on the same basis until the error estimate meets the tolerance.

    The basis grows through buffers of increasing capacity (`arnoldi.row_buckets`,
    8, 16, 32, ... rows), each entered only when the previous one is full and the
    estimate still fails, so allocation and every read follow the dimension reached.
    With `buffer`, the basis grows in that buffer instead (the recording sweep);
    error checks are placed at the same dimensions either way, so both make the same
    decisions. `finish(decomp, dim, tau, low, value)`, if given, runs on the final
    decomposition (its basis capacity is static; `low` bounds `dim + 1` from below;
    `value` is the approximation at `tau`) and its result is returned as `extra`.
    The substep does not finish in a buffer of fewer than `min_capacity` rows: it
    grows on (or, after a breakdown, moves up) to a large enough one.

    A substep shrinks its step only in the last buffer: in the others it stops growing
    only once the estimate is met (or the space is invariant, estimate 0).
    """
    m = config.max_dim
    stride = check_stride(w)
    capacities = arnoldi.row_buckets(m + 1)
    boundaries = jnp.asarray([c - 1 for c in capacities])
    if buffer is None and one_buffer(m, w):
        # A small basis is cheapest in one buffer (one compiled loop).
        buffer = jnp.zeros((m + 1,) + w.shape, w.dtype)
        keep = False
    else:
        keep = buffer is not None
    sign = jnp.where(remaining < 0, -1.0, 1.0).astype(remaining.dtype)
    cap = lax.stop_gradient(jnp.abs(remaining))
    tau_abs = jnp.minimum(lax.stop_gradient(tau_try), cap)
    if buffer is None:
        decomp0 = arnoldi.start(w, m, rows=capacities[0])
    else:
        decomp0 = arnoldi.start(w, m, buffer=buffer)
    tol = lax.stop_gradient(tol_per_time(decomp0.beta))

    def coefficients(decomp, dim, tau_abs, low):
        decomp = lax.stop_gradient(decomp)
        coeffs, rounding, guard, norm = checked_coefficients(
            decomp.hessenberg, dim, sign * lax.stop_gradient(tau_abs), low
        )
        # Saad's estimate, plus the rounding error of the small exponential where its
        # squarings amplify it; and only what the estimate with the weak couplings
        # raised accepts too (see `checked_coefficients`).
        err = error_estimate(decomp, coeffs, dim) + decomp.beta * rounding
        return coeffs, jnp.maximum(err, decomp.beta * guard), norm

    def may_finish(limit):
        return jnp.asarray(True) if min_capacity is None else limit + 1 >= min_capacity

    def done(g: _Growth, limit):
        return (g.met | g.broken | (g.dim >= m)) & may_finish(limit)

    def grow(decomp, growth: _Growth, limit, low):
        """Steps and checks until done or until the dimension reaches `limit`."""

        def step_cond(state):
            _, j, breakdown, target = state
            return (j < target) & ~breakdown

        def step_body(state):
            decomp, j, _, target = state
            decomp, breakdown = arnoldi.step(
                system.matvec, params, decomp, j, config.orth, low
            )
            return decomp, j + 1, breakdown, target

        def cond(state):
            _, g = state
            return ~done(g, limit) & (g.dim < limit) & ~g.broken

        def body(state):
            decomp, g = state
            # Never check past the next capacity boundary (see the docstring).
            index = jnp.searchsorted(boundaries, g.dim + 1, method="compare_all")
            boundary = boundaries[index]
            target = jnp.minimum(jnp.minimum(g.next_check, boundary), limit)
            decomp, dim, breakdown, _ = batching.loop(
                step_cond,
                step_body,
                (decomp, g.dim, jnp.asarray(False), target),
                limit,
                config.direct,
                arnoldi.keep_decomposition,
            )
            coeffs, err, norm = coefficients(decomp, dim, tau_abs, low)
            met = (err <= tau_abs * tol) & ((dim >= config.min_dim) | breakdown)
            log_ratio = jnp.log(err) - jnp.log(tau_abs * tol)
            next_check = _next_check(
                dim, log_ratio, g.last_dim, g.last_log_ratio, m, stride
            )
            next_check = jnp.maximum(next_check, config.min_dim)
            g = _Growth(
                dim=dim,
                met=met,
                broken=breakdown,
                coeffs=coeffs,
                err=err,
                norm=norm,
                next_check=next_check,
                last_dim=dim,
                last_log_ratio=log_ratio,
            )
            return decomp, g

        return batching.loop(
            cond,
            body,
            (decomp, growth),
            limit,
            config.direct,
            arnoldi.keep_decomposition,
        )

    def shrink_and_finish(decomp, g: _Growth, low, last):
        dim = g.dim

        def shrink_cond(state):
            return ~state[3] & (state[4] < _MAX_REJECTIONS)

        def shrink_body(state):
            tau_abs, _, err, _, count, _, last_tau, last_err = state
            ratio = err / (tau_abs * tol)
            order = _local_order(tau_abs, err, last_tau, last_err, dim)
            factor = jnp.clip(0.9 * ratio ** (-1.0 / order), 0.1, 0.9)
            factor = jnp.where(jnp.isfinite(factor), factor, 0.1)
            shorter = tau_abs * factor
            coeffs, shorter_err, norm = coefficients(decomp, dim, shorter, low)
            met = shorter_err <= shorter * tol
            return shorter, coeffs, shorter_err, met, count + 1, norm, tau_abs, err

        inf = jnp.asarray(jnp.inf, cap.dtype)
        shrink_init = (
            tau_abs,
            g.coeffs,
            g.err,
            g.met,
            jnp.asarray(0),
            g.norm,
            inf,
            inf,
        )
        if last:
            tau_shrunk, coeffs, err, accepted, rejections, norm, _, _ = batching.loop(
                shrink_cond, shrink_body, shrink_init, _MAX_REJECTIONS, config.direct
            )
        else:
            tau_shrunk, coeffs, err, accepted, rejections, norm, _, _ = shrink_init
        ends = (rejections == 0) & (tau_shrunk >= cap)
        tau = jnp.where(ends, remaining, sign * tau_shrunk)
        if config.direct:
            # Differentiate through the end time: recompute with the traced step.
            value = approximation(decomp, dim, tau, config.orth, config.corrected, low)
        else:
            value = combine(decomp, coeffs, dim, config.orth, config.corrected, low)
        ratio = err / jnp.where(tau_shrunk * tol > 0, tau_shrunk * tol, 1)
        growth = jnp.where(ratio > 0, 0.9 * ratio ** (-1.0 / dim), 10.0)
        growth = jnp.clip(jnp.where(jnp.isfinite(growth), growth, 10.0), 1.0, 10.0)
        next_try = jnp.maximum(
            tau_shrunk * growth, jnp.where(rejections == 0, tau_try, 0)
        )
        return _Substep(
            value=value,
            hessenberg=decomp.hessenberg,
            beta=decomp.beta,
            dim=dim,
            tau=tau,
            ends=ends,
            accepted=accepted,
            rejections=rejections,
            next_try=next_try,
            estimate=err,
            propagator_norm=norm,
            basis=arnoldi.single(decomp) if keep else None,
            extra=None if finish is None else finish(decomp, dim, tau, low, value),
        )

    def level(i, decomp, g):
        if buffer is not None:
            return shrink_and_finish(*grow(decomp, g, m, 1), 1, True)
        low = 1 if i == 0 else capacities[i - 1] + 1
        decomp, g = grow(decomp, g, capacities[i] - 1, low)
        if i == len(capacities) - 1:
            return shrink_and_finish(decomp, g, low, True)
        return batching.cond(
            done(g, capacities[i] - 1),
            lambda decomp, g: shrink_and_finish(decomp, g, low, False),
            lambda decomp, g: level(
                i + 1,
                arnoldi.extend(decomp, capacities[i + 1] - capacities[i], config.orth),
                g,
            ),
            decomp,
            g,
        )

    growth0 = _Growth(
        dim=jnp.asarray(0),
        met=jnp.asarray(False),
        broken=jnp.asarray(False),
        coeffs=jnp.zeros(m + 1, w.dtype),
        err=jnp.asarray(jnp.inf, cap.dtype),
        norm=jnp.asarray(1.0, cap.dtype),
        next_check=jnp.asarray(min(max(config.min_dim, stride), m)),
        last_dim=jnp.asarray(0),
        last_log_ratio=jnp.asarray(jnp.inf, cap.dtype),
    )
    return level(0, decomp0, growth0)
