"""The adaptive sweep over the output times: substep after substep from the start
vector to the final time, each output evaluated from the basis of the substep that
passes it, the result code and statistics (`growth_factor`), and what the recording
sweep keeps for the backward pass (checkpoints of the substep starts)."""

from typing import Any, NamedTuple

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from . import _arnoldi as arnoldi, _batching as batching
from ._config import _Config
from ._projected import combine, error_estimate, exp_coefficients
from ._solution import RESULTS
from ._substep import _substep, one_buffer


# Substep starts kept for the backward pass; see `_store_checkpoint`.
_CHECKPOINT_SLOTS = 16


def _checkpoint_slots(config: _Config) -> int:
    return min(config.max_substeps, _CHECKPOINT_SLOTS)


def _max_stride(config: _Config) -> int:
    stride = 1
    while _checkpoint_slots(config) * stride < config.max_substeps:
        stride *= 2
    return stride


def kept_rows(config: _Config, vector) -> int:
    """The rows of the basis buffer the backward pass keeps and rebuilds substeps in.

    A basis that grows in one buffer (`one_buffer`) is recorded in that buffer,
    `max_dim + 1` rows. A larger one grows in chunks, as without recording, and
    `config.basis_rows` rows (at most `max_dim + 1`) are kept: the last substep's
    basis when it fits, and the backward pass rebuilds in them every substep whose
    dimension fits too (a larger one in a buffer of its own). Memory that is written
    is paid for on every call (a zero fill, and on XLA:CPU page faults once the
    temporaries exceed glibc's `mmap` threshold), so this bounds it by what a
    typical dimension needs rather than by `max_dim`. Static."""
    if one_buffer(config.max_dim, vector):
        return config.max_dim + 1
    return min(config.max_dim + 1, config.basis_rows)


class _Record(NamedTuple):
    """What the forward sweep keeps for the backward pass: the start vectors of every
    `stride`-th substep, each substep's start time and step size, the outputs it
    covered (`first` to `last`, exclusive) and whether it ends at the final time, and
    the last substep's decomposition (its basis in `basis`, `kept_rows` rows, and
    whether it fitted there, `kept`)."""

    checkpoints: Array  # (slots, n)
    stride: Array
    starts: Array
    taus: Array
    first: Array
    last: Array
    ends: Array
    basis: Array  # (kept_rows, n)
    kept: Array
    hessenberg: Array
    beta: Array


def _store_checkpoint(rec: _Record, index, start) -> _Record:
    """Keep the start of substep `index` if `index` is a multiple of the stride. When
    the slots are full, every other checkpoint is dropped and the stride doubles, so
    memory stays `slots × n` however many substeps are taken, and the backward pass
    recomputes the others from them by bisection (`_backward`: about
    `log2(stride) / 2` extra forward sweeps in all, none while the substeps fit in
    the slots)."""
    slots = rec.checkpoints.shape[0]
    full = index == slots * rec.stride

    def thin(checkpoints):
        kept = checkpoints[::2]
        return jnp.concatenate([kept, jnp.zeros_like(checkpoints[kept.shape[0] :])])

    checkpoints = batching.cond(full, thin, lambda x: x, rec.checkpoints)
    stride = jnp.where(full, 2 * rec.stride, rec.stride)
    slot = jnp.minimum(index // stride, slots - 1)
    keep = index % stride == 0
    row = jnp.where(keep, start, checkpoints[slot])
    return rec._replace(checkpoints=checkpoints.at[slot].set(row), stride=stride)


class _Carry(NamedTuple):
    segment: Array
    time: Array
    w: Array
    tau_try: Array
    outputs: Array
    num_substeps: Array
    num_matvecs: Array
    num_rejected: Array
    dims: Array
    error: Array
    amplified: Array  # see `_growth_factor`
    worst: Array  # the largest `amplified` so far
    failed: Array
    record: Any  # a `_Record`, or None
    visited: Any  # accumulator of the `finish` hook's results, or None


def _loop(
    params,
    vector,
    times,
    system,
    config: _Config,
    record: bool,
    visit=None,
    acc=None,
    min_capacity=None,
):
    """The adaptive sweep over the output times (see `_sweep`). Under `vmap` it runs
    as `config.batching` says (see `_batching`): one element after another, or the
    batch in one loop. JAX's own batching of the adaptive loops would turn every
    capacity level and every conditional error check into a select that runs all
    branches, about 100× slower. Not with `DirectAdjoint`, whose loops JAX must
    differentiate."""

    def run(params, vector, times, acc, min_capacity):
        return _sweep(
            params, vector, times, system, config, record, visit, acc, min_capacity
        )

    if not config.direct:
        run = batching.under_vmap(run, config.batching, config.batch_size)
    return run(params, vector, times, acc, min_capacity)


def _sweep(
    params, vector, times, system, config: _Config, record, visit, acc, min_capacity
):
    """`visit(time, decomp, dim, tau)`, if given, runs on every substep's final
    decomposition (`time`: the substep's start) and its results are summed into
    `acc`; substeps skip basis buffers of fewer than `min_capacity` rows."""
    num_times = times.shape[0]
    n = vector.shape[0]
    real = times.dtype
    span = jnp.max(jnp.abs(times))
    span = jnp.where(span > 0, span, 1)

    def tol_per_time(beta):
        return (config.atol + config.rtol * beta) / span

    deltas = jnp.diff(jnp.concatenate([jnp.zeros(1, real), times]))
    monotone = jnp.all(deltas >= 0) | jnp.all(deltas <= 0)
    finite = jnp.all(jnp.isfinite(vector)) & jnp.all(jnp.isfinite(times))
    for leaf in jtu.tree_leaves(params):
        finite = finite & jnp.all(jnp.isfinite(leaf))
    valid = monotone & finite

    # A small basis is recorded in the buffer every substep grows in; a large one grows
    # in chunks as it would without recording and is copied when it fits.
    in_buffer = one_buffer(config.max_dim, vector)
    if record:
        rows = kept_rows(config, vector)
        start = arnoldi.start(vector, config.max_dim, rows=max(rows, 1))
        rec = _Record(
            checkpoints=jnp.zeros((_checkpoint_slots(config), n), vector.dtype),
            stride=jnp.asarray(1),
            starts=jnp.zeros(config.max_substeps, real),
            taus=jnp.zeros(config.max_substeps, real),
            first=jnp.zeros(config.max_substeps, jnp.int32),
            last=jnp.zeros(config.max_substeps, jnp.int32),
            ends=jnp.zeros(config.max_substeps, bool),
            basis=arnoldi.single(start)[:rows],
            kept=jnp.asarray(in_buffer),
            hessenberg=start.hessenberg,
            beta=start.beta,
        )
    else:
        rec = None

    init = _Carry(
        segment=jnp.where(valid, 0, num_times),
        time=jnp.zeros((), real),
        w=vector,
        tau_try=span,
        outputs=jnp.full((num_times, n), jnp.nan, vector.dtype),
        num_substeps=jnp.asarray(0),
        num_matvecs=jnp.asarray(0),
        num_rejected=jnp.asarray(0),
        dims=jnp.zeros(config.max_substeps, jnp.int32),
        error=jnp.zeros((), real),
        amplified=jnp.zeros((), real),
        worst=jnp.zeros((), real),
        failed=jnp.asarray(False),
        record=rec,
        visited=acc,
    )

    def cond(c: _Carry):
        # A non-finite state (NaN from the operator, overflow) cannot recover: stop.
        going = (c.segment < num_times) & (c.num_substeps < config.max_substeps)
        return going & jnp.all(jnp.isfinite(c.w))

    def body(c: _Carry):
        # A substep aims at the final time; every output time it passes is evaluated
        # from its basis (a small exponential and a combination each, with its own
        # error estimate), so a time grid costs no extra Krylov spaces.
        target = times[num_times - 1]
        remaining = target - c.time

        def finish(decomp, dim, tau, low, value):
            ends = tau == remaining

            # Outputs at the final time take the end value (below), however many.
            def covered(state):
                segment, _, _ = state
                inside = jnp.abs(times[segment] - c.time) <= jnp.abs(tau)
                end_point = ends & (times[segment] == target)
                return (segment < num_times) & inside & ~end_point

            def evaluate(state):
                segment, outputs, ok = state
                sigma = times[segment] - c.time
                coeffs = exp_coefficients(
                    decomp.hessenberg, dim, sigma, low, differentiable=config.direct
                )
                estimate = error_estimate(decomp, coeffs, dim)
                tol = tol_per_time(decomp.beta) * jnp.abs(sigma)
                out = combine(decomp, coeffs, dim, config.orth, config.corrected, low)
                ok = ok & (lax.stop_gradient(estimate) <= tol)
                return segment + 1, outputs.at[segment].set(out), ok

            segment, outputs, ok = batching.loop(
                covered,
                evaluate,
                (c.segment, c.outputs, jnp.asarray(True)),
                num_times,
                config.direct,
            )
            at_end = ends & (times == target)
            outputs = jnp.where(at_end[:, None], value[None], outputs)
            segment = jnp.where(ends, num_times, segment)
            visited = None if visit is None else visit(c.time, decomp, dim, tau)
            kept = None
            if c.record is not None and not in_buffer:
                kept = _keep(c.record.basis, decomp, config.orth)
            return segment, outputs, ok, visited, kept

        sub = _substep(
            system,
            params,
            c.w,
            c.tau_try,
            remaining,
            tol_per_time,
            config,
            buffer=c.record.basis if record and in_buffer else None,
            finish=finish,
            min_capacity=min_capacity,
        )
        segment, outputs, interior_ok, increment, kept = sub.extra
        if record:
            index = c.num_substeps
            r = _store_checkpoint(c.record, index, c.w)
            basis, fits = (sub.basis, jnp.asarray(True)) if in_buffer else kept
            rec = r._replace(
                starts=r.starts.at[index].set(lax.stop_gradient(c.time)),
                taus=r.taus.at[index].set(lax.stop_gradient(sub.tau)),
                first=r.first.at[index].set(c.segment),
                last=r.last.at[index].set(segment),
                ends=r.ends.at[index].set(sub.ends),
                basis=basis,
                kept=fits,
                hessenberg=sub.hessenberg,
                beta=sub.beta,
            )
        else:
            rec = None
        visited = c.visited
        if visit is not None:
            visited = jtu.tree_map(jnp.add, c.visited, increment)
        # The earlier substeps' tolerances, carried through this substep by the norm
        # of its projected propagator, and this one's (see `_growth_factor`).
        amplified = lax.stop_gradient(
            jnp.maximum(
                c.amplified * sub.propagator_norm, span * tol_per_time(sub.beta)
            )
        )
        return _Carry(
            segment=segment,
            time=jnp.where(sub.ends, target, c.time + sub.tau),
            w=sub.value,
            tau_try=sub.next_try,
            outputs=outputs,
            num_substeps=c.num_substeps + 1,
            num_matvecs=c.num_matvecs + sub.dim,
            num_rejected=c.num_rejected + sub.rejections,
            dims=c.dims.at[c.num_substeps].set(sub.dim),
            error=c.error + sub.estimate,
            amplified=amplified,
            worst=jnp.maximum(c.worst, amplified),
            failed=c.failed | ~sub.accepted | ~interior_ok,
            record=rec,
            visited=visited,
        )

    final = batching.loop(cond, body, init, config.max_substeps, config.direct)
    growth = _growth_factor(final, vector, config)
    # In order of precedence: the first that applies is reported.
    outcomes = (
        (~finite, RESULTS.nonfinite_input),
        (~monotone, RESULTS.nonmonotone_times),
        (~jnp.all(jnp.isfinite(final.w)), RESULTS.nonfinite_output),
        (final.segment < num_times, RESULTS.max_substeps_reached),
        (final.failed, RESULTS.tolerance_not_met),
        (~jnp.all(jnp.isfinite(final.outputs)), RESULTS.nonfinite_output),
        # No significant digit can be vouched for once growth * rtol >= 1.
        # (A tolerance of 1 or more asks for no digit in the first place.)
        ((config.rtol < 1) & (growth * config.rtol >= 1), RESULTS.error_amplified),
    )
    result = RESULTS.successful
    for condition, code in reversed(outcomes):
        result = RESULTS.where(condition, code, result)
    stats = {
        "num_matvecs": final.num_matvecs,
        "num_substeps": final.num_substeps,
        "num_rejected": final.num_rejected,
        "max_krylov_dim": jnp.max(final.dims),
        "krylov_dims": final.dims,
        "error_estimate": final.error,
        "growth_factor": growth,
    }
    return final, result, stats


def _keep(buffer, decomp, orth):
    """Copy the rows of a chunked decomposition into `buffer` if they fit (static:
    the chunks' capacity), and say whether they did."""
    if arnoldi.capacity(decomp, orth) > buffer.shape[0]:
        return buffer, jnp.asarray(False)
    for (offset, skip, _), chunk in zip(
        arnoldi.chunk_layout(decomp, orth), decomp.basis, strict=True
    ):
        buffer = lax.dynamic_update_slice_in_dim(buffer, chunk[skip:], offset, 0)
    return buffer, jnp.asarray(True)


def _growth_factor(final: _Carry, vector, config: _Config):
    """How far the local errors may be amplified beyond the tolerance.

    Substep `j` is accepted when its local error is below `tol_j = atol + rtol
    beta_j` (times its share of the interval), `beta_j` the norm of its start vector.
    An error committed in substep `j` reaches the end multiplied by the propagators of
    the later substeps, whose norms are estimated by those of the projected ones,
    `g_l = ||exp(tau_l H_l)||_2`. The carry holds `max_j tol_j prod_{l > j} g_l` and
    its largest value over the sweep (which covers every output time); the factor is
    the latter over `atol + rtol max(|v|, |value|)`, at least 1. It is 1 for a single
    substep and about 1 when the operator amplifies errors no more than it grows the
    solution (normal and dissipative operators), and large for strongly non-normal
    ones (Pascal- or Jordan-type transient growth), where the achieved error can
    exceed the tolerance by up to this factor although every local estimate met it.
    A product of norms bounds the norm of the product, so the factor errs on the
    pessimistic side."""
    norms = jnp.linalg.norm(final.outputs, axis=1)
    norms = jnp.where(jnp.isfinite(norms), norms, 0)
    largest = jnp.maximum(jnp.linalg.norm(vector), jnp.max(norms))
    scale = config.atol + config.rtol * largest
    factor = final.worst / jnp.where(scale > 0, scale, 1)
    return jnp.maximum(jnp.where(jnp.isnan(factor), jnp.inf, factor), 1.0)
