"""Bad input: trace-time ValueErrors where the problem is static, result codes and
runtime errors (`throw`) where it is not."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import krylovexp as kx
from support.measure import rel_err
from support.operators import laplacian_1d
from support.references import phi_ref


A = jnp.asarray(np.diag(np.linspace(-2.0, 0.0, 6)) + np.diag(np.ones(5), 1))
V = jnp.ones(6)


@pytest.mark.parametrize(
    "operator, match",
    [
        (jnp.ones((3, 4)), "square"),
        (jnp.ones(5), "square"),
        (lx.MatrixLinearOperator(jnp.ones((3, 4))), "square"),
        ("not an operator", "lineax"),
    ],
)
def test_non_square_or_wrong_operator(operator, match):
    with pytest.raises(ValueError, match=match):
        kx.expmv(operator, jnp.ones(3), 1.0)


@pytest.mark.parametrize(
    "vector",
    [jnp.ones(5), jnp.ones(6, jnp.float32), {"a": jnp.ones(6)}, jnp.ones((6, 1))],
)
def test_vector_structure_or_dtype_mismatch(vector):
    with pytest.raises(ValueError, match="input structure"):
        kx.expmv(A, vector, 1.0)
    with pytest.raises(ValueError, match="input structure"):
        kx.phimv(A, (V, vector), 1.0)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(max_krylov_dim=0), "max_krylov_dim"),
        (dict(min_krylov_dim=0), "min_krylov_dim"),
        (dict(rtol=-1e-6), "rtol"),
        (dict(atol=-1.0), "atol"),
        (dict(rtol=float("nan")), "rtol"),
        (dict(rtol=0.0, atol=0.0), "both be zero"),
        (dict(method="qr"), "method"),
        (dict(max_substeps=0), "max_substeps"),
        (dict(adjoint="backsolve"), "adjoint"),
    ],
)
def test_bad_configuration(options, match):
    with pytest.raises(ValueError, match=match):
        kx.KrylovExpm(**options)


def test_krylov_dimension_above_operator_size():
    with pytest.raises(ValueError, match="exceeds the operator size 6"):
        kx.expmv(A, V, 1.0, max_krylov_dim=7)
    # the augmented operator of phimv is larger: p extra rows are allowed
    out = kx.phimv(A, (V, V), 1.0, max_krylov_dim=7)
    assert rel_err(out, phi_ref(A, (V, V), 1.0)) < 1e-8
    with pytest.raises(ValueError, match="augmented"):
        kx.phimv(A, (V, V), 1.0, max_krylov_dim=8)


@pytest.mark.parametrize(
    "t, match",
    [(1j, "real"), (jnp.ones((2, 2)), "1-D"), (jnp.zeros(0), "empty")],
)
def test_bad_times(t, match):
    with pytest.raises(ValueError, match=match):
        kx.expmv(A, V, t)


def test_bad_phi_vectors():
    with pytest.raises(ValueError, match="non-empty tuple"):
        kx.phimv(A, (), 1.0)
    with pytest.raises(ValueError, match="non-empty tuple"):
        kx.phimv(A, V, 1.0)


solve = eqx.filter_jit(lambda solver, op, v, t: solver.expmv(op, v, t))


def test_nonfinite_input_result_code_and_error():
    quiet = kx.KrylovExpm(throw=False)
    bad_v = V.at[2].set(jnp.nan)
    assert solve(quiet, A, bad_v, 1.0).result == kx.RESULTS.nonfinite_input
    bad_a = A.at[0, 0].set(jnp.inf)
    assert solve(quiet, bad_a, V, 1.0).result == kx.RESULTS.nonfinite_input
    assert solve(quiet, A, V, jnp.nan).result == kx.RESULTS.nonfinite_input
    with pytest.raises(Exception, match="NaN or inf"):
        jax.block_until_ready(solve(kx.KrylovExpm(), A, bad_v, 1.0).value)


def test_nonmonotone_times():
    quiet = kx.KrylovExpm(throw=False)
    sol = solve(quiet, A, V, jnp.array([0.5, 0.2]))
    assert sol.result == kx.RESULTS.nonmonotone_times
    assert sol.result == solve(quiet, A, V, jnp.array([0.5, -0.2])).result
    with pytest.raises(Exception, match="monotone"):
        jax.block_until_ready(solve(kx.KrylovExpm(), A, V, jnp.array([0.5, 0.2])).value)


def test_substep_budget_exhausted():
    n = 50
    lap = laplacian_1d(n, 1e4)
    op = lx.MatrixLinearOperator(jnp.asarray(lap), lx.symmetric_tag)
    quiet = kx.KrylovExpm(max_krylov_dim=4, max_substeps=3, throw=False)
    sol = solve(quiet, op, jnp.ones(n), 1.0)
    assert sol.result == kx.RESULTS.max_substeps_reached
    assert int(sol.stats["num_substeps"]) == 3
    assert np.all(np.isnan(np.asarray(sol.value)))  # never a silent wrong answer
    with pytest.raises(Exception, match="max_substeps"):
        loud = kx.KrylovExpm(max_krylov_dim=4, max_substeps=3)
        jax.block_until_ready(solve(loud, op, jnp.ones(n), 1.0).value)


def test_overflow_is_reported():
    quiet = kx.KrylovExpm(throw=False)
    sol = solve(quiet, 800.0 * jnp.eye(6) + A, V, 1.0)  # exp(800) > float64 max
    assert sol.result == kx.RESULTS.nonfinite_output
