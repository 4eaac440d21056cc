"""Faults met at run time: an operator that turns NaN part-way through a sweep (forward
and backward pass), a NaN nonlinearity inside an exponential integrator, and one bad
member of a `vmap`ped batch. Each is reported, never passed on as a quiet NaN."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import krylovexp as kx
from support.measure import rel_err
from support.references import expm_ref


N = 6
SHIFT = np.diag(np.ones(N - 1), -1) - 0.5 * np.eye(N)  # e_1 reaches e_N after N-1 steps


def _late_nan_operator():
    """`A x`, but NaN once a vector reaches the last coordinate: the first matvecs are
    finite, a later one is not."""

    def fn(x):
        y = jnp.asarray(SHIFT) @ x
        return jnp.where(jnp.abs(x[-1]) > 0, jnp.nan, y)

    return lx.FunctionLinearOperator(fn, jax.ShapeDtypeStruct((N,), jnp.float64))


def test_operator_nan_after_some_matvecs():
    vector = jnp.zeros(N).at[0].set(1.0)
    sol = kx.KrylovExpm(throw=False).expmv(_late_nan_operator(), vector, 1.0)
    assert sol.result == kx.RESULTS.nonfinite_output
    assert int(sol.stats["num_substeps"]) <= 1  # the sweep stops at the bad state
    with pytest.raises(eqx.EquinoxRuntimeError, match="NaN|inf|finite"):
        kx.expmv(_late_nan_operator(), vector, 1.0)


@jax.custom_vjp
def _matvec_nan_transpose(x):
    return jnp.asarray(SHIFT) @ x


def _fwd(x):
    return _matvec_nan_transpose(x), None


def _bwd(_, y_bar):
    return (jnp.full_like(y_bar, jnp.nan),)


_matvec_nan_transpose.defvjp(_fwd, _bwd)


def test_operator_nan_on_the_backward_pass_only():
    """The forward pass is finite; the operator's transpose is not: the gradient
    raises instead of returning NaN."""
    op = lx.FunctionLinearOperator(
        _matvec_nan_transpose, jax.ShapeDtypeStruct((N,), jnp.float64)
    )
    vector = jnp.linspace(1.0, 2.0, N)
    value = kx.expmv(op, vector, 0.5)
    assert rel_err(value, expm_ref(SHIFT, np.asarray(vector), 0.5)) < 1e-8

    def loss(v):
        return jnp.sum(kx.expmv(op, v, 0.5) ** 2)

    # The forward sweep is one compiled program, so its transpose runs as one too: the
    # check fires inside it and reaches Python as JAX's runtime error, with the message.
    with pytest.raises(
        (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match="backward pass"
    ):
        jax.block_until_ready(jax.grad(loss)(vector))


def test_nan_nonlinearity_in_an_integrator():
    """Diffrax's own result code, not a quiet NaN trajectory."""
    terms = diffrax.MultiTerm(
        kx.LinearTerm(lx.MatrixLinearOperator(jnp.asarray(SHIFT))),
        diffrax.ODETerm(lambda t, y, args: jnp.where(t > 0.2, jnp.nan, 0.0) * y),
    )
    sol = diffrax.diffeqsolve(
        terms, kx.ETDRK2(), 0.0, 1.0, 0.1, jnp.ones(N), throw=False
    )
    assert sol.result == diffrax.RESULTS.nonfinite


def test_one_bad_member_of_a_batch():
    """Under `vmap`, only the member with a NaN start vector is flagged; the others
    are exact."""
    vectors = jnp.stack([jnp.ones(N), jnp.full(N, jnp.nan), jnp.linspace(0, 1, N)])
    solver = kx.KrylovExpm(throw=False)
    op = lx.MatrixLinearOperator(jnp.asarray(SHIFT))
    sols = jax.vmap(lambda v: solver.expmv(op, v, 0.7))(vectors)
    results = [int(r) for r in np.asarray(sols.result._value)]
    good, bad = (
        int(kx.RESULTS.successful._value),
        int(kx.RESULTS.nonfinite_input._value),
    )
    assert results == [good, bad, good]
    for i in (0, 2):
        want = expm_ref(SHIFT, np.asarray(vectors[i]), 0.7)
        assert rel_err(sols.value[i], want) < 1e-8
