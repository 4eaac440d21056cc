"""How the adaptive loops run under `vmap`: one solve after another (`"sequential"`),
or the whole batch in one loop (`"batched"`), every element advancing under its own
mask; and the loop and branch primitives the sweep and the backward pass are written
with, which mean the same as `lax.while_loop`, `lax.fori_loop` and `lax.cond`
outside the batched mode.

JAX batches a `while_loop` whose predicate differs across the batch by running it
until every element is done and selecting, after every iteration, between the new
and the old state of each element: a copy of the whole Krylov basis per Arnoldi step.
It batches a `cond` or `switch` with such a predicate by running every branch: every
size bucket of the small exponentials, every capacity level. The batched mode avoids
both. The batch is mapped with a named axis (`jax.vmap(..., axis_name=...)`), so a
loop can ask whether *any* element still goes on (`psum` over the axis, a predicate
shared by the batch: no select in JAX's rule), and a branch whether all, none or
some elements take it. A loop narrows the set of live elements for everything traced
in its body (a trace-time stack of masks), so nested loops leave finished elements
untouched and do not run on for them; state an element did not advance is restored
by a select, except where the body writes it under the mask itself (`merge`: the
Arnoldi step writes its new basis row masked, so the basis is never copied).
"""

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu


Batching = Literal["auto", "sequential", "batched"]

_AXIS = "krylovexp_batch"
# Trace-time state: whether the batched mode is being traced, and the masks of the
# live elements of the enclosing loops (innermost last; each already includes the
# ones before it).
_state = {"batched": 0}
_masks: list = []


def resolve(batching: Batching) -> str:
    """The mode `"auto"` stands for on the default backend: batched on accelerators,
    where a batch is parallel work; sequential on CPU, where the sequential loop was
    as fast or faster per solve in `benchmarks/bench_batching.py`."""
    if batching != "auto":
        return batching
    return "sequential" if jax.default_backend() == "cpu" else "batched"


def in_batched_mode() -> bool:
    return _state["batched"] > 0


@contextlib.contextmanager
def _batched_trace():
    saved = list(_masks)
    _masks.clear()
    _state["batched"] += 1
    try:
        yield
    finally:
        _state["batched"] -= 1
        _masks[:] = saved


def under_vmap(fn: Callable, mode: str, batch_size: int | None = None) -> Callable:
    """`fn` with its batching rule: `vmap` runs it once per element (`"sequential"`)
    or once for the batch with the named axis (`"batched"`), in groups of at most
    `batch_size` elements one after another if given (as `lax.map(...,
    batch_size=...)`). Inside the batched trace, `fn` is already per element, so it
    is called as it is."""
    if mode == "sequential":
        return jax.custom_batching.sequential_vmap(fn)
    if mode != "batched":
        raise ValueError(f"Unknown batching mode {mode!r}.")

    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        if axis_size == 1:
            # A batch of one needs no masks.
            args = jtu.tree_map(
                lambda x, b: x[0] if b else x, list(args), list(in_batched)
            )
            out = fn(*args)
            return jtu.tree_map(lambda x: x[None], out), jtu.tree_map(
                lambda _: True, out
            )
        if batch_size is not None and axis_size > batch_size:
            # Groups of `batch_size`: `lax.map` maps `wrapped` over each group with
            # `vmap`, which comes back to this rule with a smaller axis.
            mask, args = list(in_batched), list(args)
            mapped = jtu.tree_map(lambda b, x: x if b else None, mask, args)
            shared = jtu.tree_map(lambda b, x: None if b else x, mask, args)

            def group(mapped):
                merged = jtu.tree_map(
                    lambda b, m, c: m if b else c, mask, mapped, shared
                )
                return wrapped(*merged)

            out = lax.map(group, mapped, batch_size=batch_size)
            return out, jtu.tree_map(lambda _: True, out)
        in_axes = jtu.tree_map(lambda b: 0 if b else None, list(in_batched))
        with _batched_trace():
            out = jax.vmap(fn, in_axes=in_axes, axis_name=_AXIS, axis_size=axis_size)(
                *args
            )
        return out, jtu.tree_map(lambda _: True, out)

    def call(*args):
        if in_batched_mode():
            return fn(*args)
        return wrapped(*args)

    return call


def active():
    """The mask of the live elements in the loop being traced (per element, under the
    batched mode's `vmap`), or None outside the batched mode or outside any loop."""
    return _masks[-1] if (in_batched_mode() and _masks) else None


def _count(mask) -> jax.Array:
    return lax.psum(jnp.asarray(mask).astype(jnp.int32), _AXIS)


def select(mask, new, old):
    """Per element: `new` where `mask`, else `old` (pytrees)."""
    return jtu.tree_map(lambda a, b: jnp.where(mask, a, b), new, old)


def batch_max(x: jax.Array) -> jax.Array:
    """The largest `x` over the live elements of the batch (`x` itself outside the
    batched mode): a value shared by the batch, as a branch index must be."""
    if not in_batched_mode():
        return x
    mask = active()
    if mask is not None:
        x = jnp.where(mask, x, jnp.iinfo(x.dtype).min)
    return lax.pmax(x, _AXIS)


def loop(
    cond_fun: Callable,
    body_fun: Callable,
    init: Any,
    max_steps: int | None = None,
    direct: bool = False,
    merge: Callable | None = None,
):
    """`lax.while_loop`; bounded (reverse-differentiable) with `direct`. In the
    batched mode the loop runs while any live element's `cond_fun` holds, and
    `merge(mask, new, old)` (default `select`) keeps the elements that did not
    advance; a `merge` that takes a leaf from `new` unselected relies on the body
    writing it under `active()`."""
    if direct:
        return eqxi.while_loop(
            cond_fun, body_fun, init, max_steps=max_steps, kind="bounded"
        )
    if not in_batched_mode():
        return lax.while_loop(cond_fun, body_fun, init)
    outer = active()

    def live(state):
        going = cond_fun(state)
        return going if outer is None else outer & going

    def body(state):
        mask = live(state)
        _masks.append(mask)
        try:
            new = body_fun(state)
        finally:
            _masks.pop()
        return (merge or select)(mask, new, state)

    return lax.while_loop(lambda state: _count(live(state)) > 0, body, init)


def fori(lower, upper, body_fun: Callable, init: Any, merge: Callable | None = None):
    """`lax.fori_loop`, batched as `loop` in the batched mode (the bounds may differ
    across the batch)."""
    if not in_batched_mode():
        return lax.fori_loop(lower, upper, body_fun, init)
    lower = jnp.asarray(lower)

    def merge_indexed(mask, new, old):
        return (
            jnp.where(mask, new[0], old[0]),
            (merge or select)(mask, new[1], old[1]),
        )

    return loop(
        lambda state: state[0] < upper,
        lambda state: (state[0] + 1, body_fun(state[0], state[1])),
        (lower, init),
        merge=merge_indexed,
    )[1]


def cond(pred, true_fun: Callable, false_fun: Callable, *operands):
    """`lax.cond`. In the batched mode: `true_fun` alone when every live element takes
    it; otherwise `false_fun`, and `true_fun` too only if some element takes it, with a
    select. `false_fun` is traced once and `true_fun` twice, so a recursion (the
    capacity levels of a substep) belongs in `false_fun`, or the compiled code doubles
    with every level."""
    if not in_batched_mode():
        return lax.cond(pred, true_fun, false_fun, *operands)
    mask = active()
    live = jnp.asarray(True) if mask is None else mask
    taking = _count(pred & live)
    alive = _count(live)

    def otherwise(*operands):
        rejected = false_fun(*operands)
        # Both branches have the same types (as `lax.cond` requires), so zeros like
        # `rejected` (weak types included) stand for `true_fun` when none takes it.
        taken = lax.cond(
            taking > 0,
            true_fun,
            lambda *_: jtu.tree_map(jnp.zeros_like, rejected),
            *operands,
        )
        return select(pred, taken, rejected)

    return lax.cond(taking == alive, true_fun, otherwise, *operands)
