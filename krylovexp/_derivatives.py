"""How `KrylovAdjoint` enters JAX's autodiff: the evaluation is a custom JVP whose
tangent is a primitive linear in the input tangents. Forward mode evaluates that
primitive by one adaptive sweep of a block operator (the tangent of the exact
solution); reverse mode transposes it into the backward pass of `_backward.py`."""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.interpreters import ad, batching

from . import _arnoldi as arnoldi
from ._backward import _backward
from ._batching import under_vmap
from ._config import _Config
from ._operator import AbstractSystem
from ._solution import error_if
from ._sweep import _loop


@eqx.filter_custom_jvp
def evaluate_custom(params, vector, times, *, system, config: _Config):
    final, result, stats = _loop(params, vector, times, system, config, record=False)
    return final.outputs, result, stats


@evaluate_custom.def_jvp
def _evaluate_jvp(primals, tangents, *, system, config):
    params, vector, times = eqxi.nondifferentiable(primals, msg=_SECOND_ORDER)
    final, result, stats = _loop(params, vector, times, system, config, record=True)
    residuals = (final.record, final.dims, final.num_substeps)
    # The result code and statistics have zero tangents.
    no_tangent = jtu.tree_map(lambda _: None, (result, stats))
    if all(t is None for t in jtu.tree_leaves(tangents, is_leaf=_is_none)):
        return (final.outputs, result, stats), (None, *no_tangent)
    # The tangents come first, so that `_tangent_batch_rule` finds them.
    num_tangents = len(jtu.tree_leaves(tangents))
    (outputs_dot,) = eqxi.filter_primitive_bind(
        _tangent_p,
        num_tangents,
        tangents,
        primals,
        final.outputs,
        residuals,
        system,
        config,
    )
    return (final.outputs, result, stats), (outputs_dot, *no_tangent)


def _is_none(x) -> bool:
    return x is None


def _is_undefined(x) -> bool:
    return isinstance(x, ad.UndefinedPrimal)


def _tangent_abstract_eval(
    num_tangents, tangents, primals, outputs, residuals, system, config
):
    del num_tangents, tangents, primals, residuals, system, config
    return (jax.core.ShapedArray(outputs.shape, outputs.dtype),)


def _tangent_impl(num_tangents, tangents, primals, outputs, residuals, system, config):
    """Forward mode: `d/dε exp(t (A + εB)) (v + εδv) = exp(tA) δv + ∫_0^t exp((t-s)A)
    B exp(sA) v ds` is the top block of `exp(tM) [δv; v]`, `M = [[A, B], [0, A]]`
    (Van Loan 1978), with `B` the JVP of the matvec in the parameter tangent; one
    adaptive sweep of `M` evaluates it to the tolerance, as the value. A time tangent
    adds `δt_j A u(t_j)`."""
    del num_tangents, residuals
    params, vector, times = primals
    params_dot, vector_dot, times_dot = tangents
    tangent = jnp.zeros_like(outputs)
    if vector_dot is not None or params_dot is not None:
        if vector_dot is None:
            vector_dot = jnp.zeros_like(vector)
        if params_dot is None:
            final, _, _ = _loop(params, vector_dot, times, system, config, record=False)
            tangent = final.outputs
        else:
            params_dot = jtu.tree_map(
                lambda t, p: jnp.zeros_like(p) if t is None and p is not None else t,
                params_dot,
                params,
                is_leaf=_is_none,
            )
            tangent = _perturbation_sweep(
                params, vector, times, params_dot, vector_dot, system, config
            )
    if times_dot is not None:
        rates = jax.vmap(lambda u: system.matvec(params, u))(outputs)
        tangent = tangent + times_dot[:, None].astype(outputs.dtype) * rates
    return (tangent,)


def _perturbation_sweep(params, vector, times, params_dot, vector_dot, system, config):
    # The top block is carried at the scale `sigma` of the tangent it builds up (`δv`
    # and `t B v`), so that the sweep's relative tolerance applies to the tangent and
    # not to the (possibly much larger) value in the bottom block.
    real = times.dtype
    span = jnp.max(jnp.abs(times)).astype(real)
    perturbed = _perturbation(system, params, params_dot, vector)
    size = jnp.linalg.norm(vector_dot) + span * jnp.linalg.norm(perturbed)
    base = jnp.linalg.norm(vector)
    sigma = jnp.where((size > 0) & (base > 0), size / jnp.where(base > 0, base, 1), 1)
    sigma = jax.lax.stop_gradient(sigma.astype(real))
    start = jnp.concatenate([vector_dot / sigma.astype(vector.dtype), vector])
    block = _PerturbationSystem(system)
    block_params = (params, params_dot, sigma)
    final, _, _ = _loop(
        block_params,
        start,
        times,
        block,
        config._replace(orth=arnoldi.FULL),
        record=False,
    )
    n = vector.shape[0]
    return final.outputs[:, :n] * sigma.astype(vector.dtype)


def _perturbation(system, params, params_dot, x):
    return jax.jvp(lambda p: system.matvec(p, x), (params,), (params_dot,))[1]


class _PerturbationSystem(AbstractSystem):
    """`[x; y] ↦ [A x + B y / σ; A y]`, `B` the parameter-tangent derivative of `A`."""

    base: AbstractSystem

    def matvec(self, params, x):
        base_params, params_dot, sigma = params
        n = x.shape[0] // 2
        top, bottom = x[:n], x[n:]
        value, perturbed = jax.jvp(
            lambda p: self.base.matvec(p, bottom), (base_params,), (params_dot,)
        )
        top = self.base.matvec(base_params, top) + perturbed / sigma.astype(x.dtype)
        return jnp.concatenate([top, value])


_SECOND_ORDER = (
    "Second derivatives (a derivative of a derivative) are not available with "
    "krylovexp.KrylovAdjoint(); pass `adjoint=krylovexp.DirectAdjoint()` to "
    "differentiate through the Krylov loops instead."
)


def _tangent_jvp(primals, tangents):
    raise NotImplementedError(_SECOND_ORDER)


def _tangent_transpose(inputs, cotangents):
    """Reverse mode: the transpose of the tangent map is the backward pass."""
    _, tangents, primals, outputs, residuals, system, config = inputs
    (outputs_bar,) = cotangents
    params, vector, times = primals
    params_dot, vector_dot, times_dot = tangents
    want_params = any(
        map(_is_undefined, jtu.tree_leaves(params_dot, is_leaf=_is_undefined))
    )
    want_times = _is_undefined(times_dot)

    # Under `vmap` as the forward sweep runs (see `_loop`).
    def backward(params, vector, times, residuals, outputs_bar):
        return _backward(
            params,
            vector,
            times,
            residuals,
            outputs_bar,
            system,
            config,
            want_params,
            want_times,
        )

    backward = under_vmap(backward, config.batching, config.batch_size)
    grads = backward(params, vector, times, residuals, outputs_bar)
    if config.throw:
        # A NaN the operator's VJP produces on the backward pass only (the forward
        # pass was finite) must not reach the user as a quiet NaN gradient.
        finite_in = jnp.all(jnp.isfinite(outputs_bar))
        finite_out = jnp.all(
            jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jtu.tree_leaves(grads)])
        )
        grads = error_if(
            grads,
            finite_in & ~finite_out,
            "The gradient of the Krylov matrix function is not finite although its "
            "cotangent is: the operator's transpose or the VJP of its matvec "
            "produced NaN/inf on the backward pass.",
        )
    params_bar, vector_bar, times_bar = grads
    params_bar = jtu.tree_map(
        lambda t, g: g if _is_undefined(t) else None,
        params_dot,
        params_bar,
        is_leaf=lambda x: x is None or _is_undefined(x),
    )
    tangents_bar = (
        params_bar,
        vector_bar if _is_undefined(vector_dot) else None,
        times_bar if want_times else None,
    )
    # Only the tangents are linear inputs; everything else gets no cotangent.
    rest = jtu.tree_map(lambda _: None, (primals, outputs, residuals, system, config))
    return (None, tangents_bar, *rest)


_tangent_p = eqxi.create_vprim(
    "krylov_tangent",
    eqxi.filter_primitive_def(_tangent_impl),
    eqxi.filter_primitive_def(_tangent_abstract_eval),
    eqxi.filter_primitive_jvp(_tangent_jvp),
    eqxi.filter_primitive_transpose(materialise_zeros=True)(_tangent_transpose),
)
_vmapped_batch_rule = batching.fancy_primitive_batchers[_tangent_p]


def _tangent_batch_rule(axis_data, inputs, batch_axes, **params):
    """Under `vmap` the transpose returns one cotangent per batch member; a tangent
    shared by the batch (a parameter tangent under `vmap(f, in_axes=(None, 0))`)
    needs their sum. Broadcasting such tangents first makes the transpose of the
    broadcast do the sum."""
    if any(b is not None for b in batch_axes):
        num_tangents = params["static"][0]
        inputs, batch_axes = list(inputs), list(batch_axes)
        for i in range(num_tangents):
            if batch_axes[i] is None:
                x = inputs[i]
                inputs[i] = jnp.broadcast_to(x, (axis_data.size,) + jnp.shape(x))
                batch_axes[i] = 0
    return _vmapped_batch_rule(axis_data, tuple(inputs), tuple(batch_axes), **params)


batching.fancy_primitive_batchers[_tangent_p] = _tangent_batch_rule
