"""The backward pass of `KrylovAdjoint` (entered from `_derivatives.py`): it rebuilds
each substep of the recorded forward sweep from its checkpoint and carries the
cotangents through it, as the adjoint of the exact solution (an adaptive sweep of
the transposed operator, `_solution_adjoint`) or as the adjoint of the
Arnoldi/Lanczos iteration."""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _arnoldi as arnoldi, _batching as batching
from ._config import _Config
from ._operator import AbstractSystem
from ._projected import (
    approximation,
    coefficient_mask,
    exp_coefficients,
    exp_gram,
    extended_hessenberg,
)
from ._sweep import _loop, _max_stride


def _backward(
    params,
    vector,
    times,
    residuals,
    outputs_bar,
    system,
    config,
    want_params,
    want_times,
):
    rec, dims, num_substeps = residuals
    num_times = times.shape[0]
    params_bar = jtu.tree_map(jnp.zeros_like, params)
    times_bar = jnp.zeros_like(times)
    w_bar = jnp.zeros_like(vector)
    # Substeps whose basis fits the kept rows are rebuilt in them; a larger one in a
    # buffer of its own, allocated (and written) only when one occurs.
    rows = rec.basis.shape[0]
    full_rows = config.max_dim + 1

    def by_size(s, small, large, *operands):
        if rows >= full_rows:
            return small(*operands)
        if rows < 2:
            return large(*operands)
        return batching.cond(dims[s] + 1 <= rows, small, large, *operands)

    def fresh(size):
        return jnp.zeros((size,) + vector.shape, vector.dtype)

    def rebuild(start, s, buffer):
        return arnoldi.build(
            system.matvec, params, start, dims[s], config.max_dim, config.orth, buffer
        )

    def advance(index, w):
        """The start of substep `index + 1` from that of substep `index`."""

        def advance_in(size):
            def run(w):
                decomp = rebuild(w, index, fresh(size))
                return approximation(
                    decomp,
                    dims[index],
                    rec.taus[index],
                    config.orth,
                    config.corrected,
                    differentiable=False,
                )

            return run

        return by_size(index, advance_in(max(rows, 1)), advance_in(full_rows), w)

    def substep_start(s, stack):
        """The start of substep `s`, visited in decreasing order. With a stride of one
        it is a checkpoint. Otherwise it is recomputed from the nearest start held
        below it (its segment's checkpoint, or one on `stack`), and on the way the
        start halfway to `s` is pushed, then halfway from there, ...: a segment of
        `stride` substeps costs about `stride log2(stride) / 2` advances and needs
        `log2(stride)` rows (bisection checkpointing, as in Griewank's `revolve`),
        where keeping every start of the segment would write `stride` rows on every
        call, however few substeps were taken."""
        if stack is None:
            return rec.checkpoints[s], stack
        vectors, indices = stack
        depth = vectors.shape[0] - 1  # the last row is scratch
        int_type = indices.dtype
        unused = jnp.iinfo(int_type).max
        first = (s // rec.stride) * rec.stride
        # Held starts are the entries at or below `s`, in increasing order from slot
        # 0; those above it were visited already (and free slots hold `unused`).
        top = jnp.sum(indices <= s).astype(int_type)
        held = top > 0
        below = jnp.maximum(top - 1, 0)
        index = jnp.where(held, indices[below], first).astype(int_type)
        w = jnp.where(held, vectors[below], rec.checkpoints[s // rec.stride])

        def not_there(state):
            return state[0] < s

        def step(state):
            index, target, w, vectors, indices, top = state
            w = advance(index, w)
            index = index + 1
            push = (index == target) & (index < s) & (top < depth)
            slot = jnp.where(push, top, depth)
            vectors = vectors.at[slot].set(w)
            indices = indices.at[slot].set(jnp.where(push, index, unused))
            top = top + push.astype(top.dtype)
            halfway = (index + (s - index + 1) // 2).astype(int_type)
            target = jnp.where(index == target, halfway, target)
            return index, target, w, vectors, indices, top

        target = (index + (s - index + 1) // 2).astype(int_type)
        _, _, w, vectors, indices, _ = batching.loop(
            not_there, step, (index, target, w, vectors, indices, top)
        )
        return w, (vectors, indices)

    def body(k, carry):
        w_bar, params_bar, times_bar, stack, basis = carry
        s = num_substeps - 1 - k
        start, stack = substep_start(s, stack)

        def small(basis, w_bar, params_bar, times_bar):
            # The last substep's basis is kept from the forward pass when it fitted;
            # the others are rebuilt in the same buffer from their start vectors.
            decomp = batching.cond(
                (k == 0) & rec.kept,
                lambda basis: arnoldi.Decomposition((basis,), rec.hessenberg, rec.beta),
                lambda basis: rebuild(start, s, basis),
                basis,
            )
            bars = substep_adjoint(s, decomp, w_bar, params_bar, times_bar)
            return (*bars, arnoldi.single(decomp))

        def large(basis, w_bar, params_bar, times_bar):
            decomp = rebuild(start, s, fresh(full_rows))
            return (*substep_adjoint(s, decomp, w_bar, params_bar, times_bar), basis)

        w_bar, params_bar, times_bar, basis = by_size(
            s, small, large, basis, w_bar, params_bar, times_bar
        )
        return w_bar, params_bar, times_bar, stack, basis

    def substep_adjoint(s, decomp, w_bar, params_bar, times_bar):
        """The cotangents of substep `s` (basis `decomp`) from those of its end."""
        dim, tau, time0 = dims[s], rec.taus[s], rec.starts[s]
        first, last = rec.first[s], rec.last[s]

        def value_at(sigma, basis, hessenberg, beta):
            decomp = arnoldi.Decomposition((basis,), hessenberg, beta)
            return approximation(decomp, dim, sigma, config.orth, config.corrected)

        def output_bar(j):
            """The cotangent of output `j` if this substep covered it, else 0."""
            mine = (j >= first) & (j < last)
            return jnp.where(mine, outputs_bar[jnp.clip(j, 0, num_times - 1)], 0)

        def offset(j):
            return times[jnp.clip(j, 0, num_times - 1)] - time0

        # Outputs at the substep's end join the cotangent of its end value; the others
        # enter the adjoint where they were taken (visited from the end backwards).
        def at_end(j):
            return rec.ends[s] & (j == num_times - 1) | (offset(j) == tau)

        end_bar = w_bar
        for_end = jnp.arange(num_times)
        end_mask = (for_end >= first) & (for_end < last) & jax.vmap(at_end)(for_end)
        # A product rather than a sum over axis 0: see `_solver_base._plus_each_row`.
        ones = jnp.ones(num_times, outputs_bar.dtype)
        end_bar = end_bar + ones @ jnp.where(end_mask[:, None], outputs_bar, 0)
        single = arnoldi.single(decomp)

        if want_times:
            # Output j moves with t_j alone: d u(σ_j) / d t_j = A u(σ_j).
            def add_time_bar(j, times_bar):
                _, rate = jax.jvp(
                    lambda sigma: value_at(
                        sigma, single, decomp.hessenberg, decomp.beta
                    ),
                    (offset(j),),
                    (jnp.ones_like(tau),),
                )
                return times_bar.at[j].add(jnp.real(jnp.sum(output_bar(j) * rate)))

            times_bar = batching.fori(first, last, add_time_bar, times_bar)

        if config.solution_adjoint:
            # From the end back to the first interior output with a nonzero
            # cotangent, then on to the next, ..., and finally to the start.
            def segment_cond(state):
                j, _, _, _ = state
                return j >= first - 1

            def segment_body(state):
                j, lam, params_bar, position = state
                ubar = output_bar(j)
                inject = (j >= first) & ~at_end(j) & jnp.any(ubar != 0)
                stop = jnp.where(j >= first, offset(j), jnp.zeros_like(tau))
                run = inject | (j == first - 1)

                def advance(lam, params_bar):
                    return _solution_adjoint(
                        system,
                        params,
                        decomp,
                        dim,
                        position,
                        position - stop,
                        lam,
                        params_bar,
                        config,
                        want_params,
                        rows,
                    )

                lam, params_bar = batching.cond(
                    ~run,
                    lambda lam, params_bar: (lam, params_bar),
                    advance,
                    lam,
                    params_bar,
                )
                lam = lam + jnp.where(inject, ubar, 0)
                position = jnp.where(run, stop, position)
                return j - 1, lam, params_bar, position

            _, start_bar, params_bar, _ = batching.loop(
                segment_cond,
                segment_body,
                (last - 1, end_bar, params_bar, tau),
            )
        else:

            def cotangents(j, acc):
                ubar = output_bar(j)
                _, vjp = jax.vjp(
                    lambda *d: value_at(offset(j), *d),
                    single,
                    decomp.hessenberg,
                    decomp.beta,
                )
                bars = vjp(jnp.where(at_end(j), 0, ubar))
                return jtu.tree_map(jnp.add, acc, bars)

            _, vjp = jax.vjp(
                lambda *d: value_at(tau, *d), single, decomp.hessenberg, decomp.beta
            )
            bars = batching.fori(first, last, cotangents, vjp(end_bar))
            basis_bar, hessenberg_bar, beta_bar = bars
            start_bar, params_bar = arnoldi.reverse_sweep(
                system.matvec,
                params,
                decomp,
                dim,
                config.orth,
                basis_bar,
                hessenberg_bar,
                beta_bar,
                params_bar,
            )
        return start_bar, params_bar, times_bar

    max_stride = _max_stride(config)
    if max_stride == 1:
        stack = None
    else:
        # Room for log2(max_stride) starts, and a scratch row.
        depth = max_stride.bit_length()
        stack = (
            jnp.zeros((depth + 1,) + vector.shape, vector.dtype),
            jnp.full(depth + 1, jnp.iinfo(dims.dtype).max, dims.dtype),
        )
    w_bar, params_bar, times_bar, _, _ = batching.fori(
        0, num_substeps, body, (w_bar, params_bar, times_bar, stack, rec.basis)
    )
    return params_bar, w_bar, times_bar


class _TransposedSystem(AbstractSystem):
    """`y ↦ Aᵀ y` (JAX's transpose, matching its cotangent convention) of a system."""

    system: AbstractSystem

    def matvec(self, params, y):
        _, vjp = jax.vjp(lambda x: self.system.matvec(params, x), jnp.zeros_like(y))
        return vjp(y)[0]


# Rows combined per product in `_matvec_vjp_sum`.
_COMBINED_ROWS = 8


def _matvec_vjp_sum(
    system, params, forward, gram, adjoint, orth, forward_count, adjoint_count
):
    """`∂θ Σ_{a,b} gram[a, b] ⟨z_a, A(θ) q_b⟩` over the rows `q_b` of `forward` (one
    array; `b < forward_count`) and `z_a` of the decomposition `adjoint` (its basis
    orthogonalised by `orth`; `a < adjoint_count`; `gram` vanishes outside both),
    with one VJP of the matvec per row of the shorter side: `Σ_b ∂θ⟨c_b, A q_b⟩`
    with `c_b = Σ_a gram[a, b] z_a`, or `Σ_a ∂θ⟨z_a, A d_a⟩` with
    `d_a = Σ_b gram[a, b] q_b` (the matvec is linear in its vector, so both are the
    same sum).

    The combinations `c_b` (or `d_a`) are formed `_COMBINED_ROWS` at a time, by one
    product that reads the other basis once: one at a time, each read all of it, and
    at 128², ‖tA‖ = 1000 (101 forward rows) that was half the gradient's time.

    The VJPs run one row at a time: batching rows makes XLA:CPU fuse a stencil into
    a reduction over rows and space, slower per row than applying it row by row (4
    rows: 1.2-1.5× the time of the whole gradient on the problems measured). The
    price is that parameter-only work inside the matvec (an MLP coefficient field
    evaluated in it, say) is repeated for every row: evaluate such a field outside
    the operator and close over the array."""
    over_adjoint = adjoint_count < forward_count
    block = _COMBINED_ROWS
    # Padded so that every block of rows or columns can be sliced whole.
    pad = (-gram.shape[0]) % block, (-gram.shape[1]) % block
    padded = jnp.pad(gram, ((0, pad[0]), (0, pad[1])))

    def combined_forward(low):
        # `c_b` for b in [low, low + block): columns of `gram` against `adjoint`.
        weights = lax.dynamic_slice_in_dim(padded, low, block, axis=1)
        return arnoldi.weighted_sum(adjoint, weights[: gram.shape[0]], orth)

    def combined_adjoint(low):
        # `d_a` for a in [low, low + block): rows of `gram` against `forward`.
        weights = lax.dynamic_slice_in_dim(padded, low, block, axis=0)
        return jnp.tensordot(weights[:, : gram.shape[1]], forward, axes=(1, 0))

    def body(index, total):
        low = index * block
        combined = batching.cond(over_adjoint, combined_adjoint, combined_forward, low)

        def one_row(offset, total):
            i = low + offset
            mine = lax.dynamic_index_in_dim(combined, offset, keepdims=False)

            def forward_row(i):
                return lax.dynamic_index_in_dim(forward, i, keepdims=False), mine

            def adjoint_row(i):
                return mine, arnoldi.row(adjoint, i, orth)

            row, cotangent = batching.cond(over_adjoint, adjoint_row, forward_row, i)
            _, vjp = jax.vjp(lambda p: system.matvec(p, row), params)
            return jtu.tree_map(jnp.add, total, vjp(cotangent)[0])

        return batching.fori(0, jnp.minimum(block, count - low), one_row, total)

    count = jnp.minimum(forward_count, adjoint_count)
    zero = jtu.tree_map(jnp.zeros_like, params)
    return batching.fori(0, (count + block - 1) // block, body, zero)


# The most memory a wider transposed sweep may add (see `_solution_adjoint`): 4 MiB,
# 69 extra rows at 64². Every call pays for the memory XLA:CPU assigns, whether or
# not a large substep occurs, and on the gradient at 128² 9 MB more took the
# temporaries past glibc's 32 MiB `mmap` threshold: 3x the time per call.
_WIDE_ADJOINT_BYTES = 4 * 2**20


def _solution_adjoint(
    system,
    params,
    decomp,
    dim,
    position,
    length,
    w_bar,
    params_bar,
    config: _Config,
    want_params,
    adjoint_rows: int,
):
    """Cotangents of one substep `w ↦ u(tau) = exp(tau A(θ)) w` as the adjoint of the
    exact solution, over the part `[position - length, position]` of the substep
    (`w_bar`: the cotangent at `position`; the result: the one at `position - length`
    and the accumulated parameter cotangent).

    With `λ(s) = exp((tau - s)Aᵀ) w̄` and `u(s) = exp(sA) w`,

        w̄_start = λ(0),    θ̄ += ∫_0^tau ∂θ⟨λ(s), A(θ) u(s)⟩ ds.

    `λ` comes from an adaptive Krylov sweep of the transposed operator from `w̄`; on
    each of its substeps `λ(s) = Z z(s)` and `u(s) = Q y(s)` (the forward basis), so
    the integral is `∂θ Σ_b ⟨c_b, A(θ) q_b⟩` with `c_b = Σ_a G[a, b] z_a` and `G` the
    exact integral of `z(s) y(s)ᵀ` (`exp_gram`): VJPs of the matvec over the
    forward basis (`_matvec_vjp_sum`), done while the adjoint substep's basis is at
    hand. Both factors are solutions, smooth where the true ones are, so rough
    parameter directions are damped as they are by `exp(tau A)`.
    """
    orth = config.orth if config.orth.head == 0 else arnoldi.FULL
    m1 = arnoldi.single(decomp).shape[0]
    hessenberg = decomp.hessenberg[:m1, : m1 - 1]
    # The adjoint's basis takes at most `adjoint_rows` rows (the kept rows, see
    # `_sweep.kept_rows`), so that it needs no more memory than the kept basis: where
    # it needs a larger dimension it takes more, shorter substeps instead. Except
    # after a plain Lanczos substep rebuilt in the `max_dim + 1` rows of a larger
    # buffer, when the extra rows are small (`_WIDE_ADJOINT_BYTES`): its transposed
    # sweep takes as many: cut into short substeps, each combining its vectors with
    # the whole forward basis, it restarts often, and at 64², ‖tA‖ = 1000 the gradient
    # took 3x as long even with the VJPs over the shorter basis (102 against 34 ms;
    # see benchmarks/README.md for why Arnoldi is left out).
    extra_bytes = (m1 - adjoint_rows) * w_bar.size * w_bar.dtype.itemsize
    wide = (
        arnoldi.is_lanczos(orth)
        and m1 > adjoint_rows
        and extra_bytes <= _WIDE_ADJOINT_BYTES
    )
    adjoint_dim_max = (m1 if wide else min(m1, max(adjoint_rows, 2))) - 1
    inner = config._replace(
        orth=orth,
        max_dim=adjoint_dim_max,
        min_dim=min(config.min_dim, adjoint_dim_max),
        solution_adjoint=False,
        direct=False,
    )
    forward = extended_hessenberg(hessenberg, dim)
    forward_mask = coefficient_mask(m1, dim, config.corrected)

    def visit(time, adjoint, adjoint_dim, adjoint_tau):
        # This adjoint substep covers s from position - time back by its own tau.
        # A chunked basis holds both dimensions (`min_capacity` below), so the small
        # exponentials take its static capacity; a one-buffer basis is bucketed.
        size = arnoldi.capacity(adjoint, inner.orth)
        low = 1 if len(adjoint.basis) == 1 else size
        near = position - time - adjoint_tau
        y_near = exp_coefficients(hessenberg, dim, near, low, differentiable=False)
        y_near = decomp.beta * y_near
        # Padded to the forward basis' rows, where the adjoint's basis is smaller.
        extended = extended_hessenberg(adjoint.hessenberg, adjoint_dim, size=m1)
        gram = exp_gram(
            extended, adjoint_dim, forward, dim, y_near, adjoint_tau, low=low
        )
        adjoint_mask = coefficient_mask(m1, adjoint_dim, inner.corrected)
        gram = jnp.where(adjoint_mask[:, None] & forward_mask[None, :], gram, 0)
        gram = gram * adjoint.beta.astype(gram.dtype)
        used = int(config.corrected)  # coefficients in use: dim + 1 or dim
        return _matvec_vjp_sum(
            system,
            params,
            arnoldi.single(decomp),
            gram,
            adjoint,
            inner.orth,
            dim + used,
            adjoint_dim + used,
        )

    final, _, _ = _loop(
        params,
        w_bar,
        jnp.reshape(length, (1,)),
        _TransposedSystem(system),
        inner,
        False,
        visit if want_params else None,
        params_bar if want_params else None,
        min_capacity=jnp.minimum(dim, adjoint_dim_max) + 1 if want_params else None,
    )
    return final.outputs[0], (final.visited if want_params else params_bar)
