"""ExpmLinearOperator: a Lineax operator whose mv is exp(tA)v."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.linalg

import krylovexp as kx
from support.measure import rel_err
from support.operators import convection_diffusion_1d, laplacian_1d, random_hermitian


N = 24
LAP = laplacian_1d(N, 50.0)
NONSYM = convection_diffusion_1d(N, velocity=10.0) / 400.0
U0 = np.sin(np.linspace(0, 3, N)) + 0.2


@pytest.mark.slow
def test_mv_transpose_and_matrix():
    op = kx.ExpmLinearOperator(jnp.asarray(NONSYM), 0.7, kx.KrylovExpm(rtol=1e-12))
    dense = scipy.linalg.expm(0.7 * NONSYM)
    assert rel_err(op.mv(jnp.asarray(U0)), dense @ U0) < 1e-11
    assert rel_err(op.T.mv(jnp.asarray(U0)), dense.T @ U0) < 1e-11
    assert rel_err(op.as_matrix(), dense) < 1e-11
    assert rel_err(lx.materialise(op).as_matrix(), dense) < 1e-11
    assert rel_err(lx.diagonal(op), np.diag(dense)) < 1e-11
    assert rel_err(lx.conj(op).mv(jnp.asarray(U0)), dense @ U0) < 1e-11
    structure = jax.ShapeDtypeStruct((N,), jnp.float64)
    assert op.in_structure() == op.out_structure() == structure


def test_structure_queries_follow_the_operator():
    sym = kx.ExpmLinearOperator(
        lx.MatrixLinearOperator(jnp.asarray(LAP), lx.symmetric_tag)
    )
    assert lx.is_symmetric(sym) and lx.is_positive_semidefinite(sym)
    assert not lx.is_negative_semidefinite(sym) and not lx.has_unit_diagonal(sym)
    assert not lx.is_diagonal(sym) and not lx.is_tridiagonal(sym)
    nonsym = kx.ExpmLinearOperator(jnp.asarray(NONSYM))
    assert not lx.is_symmetric(nonsym) and not lx.is_positive_semidefinite(nonsym)
    diag = kx.ExpmLinearOperator(
        lx.DiagonalLinearOperator(jnp.linspace(-1.0, 0.0, N)), 2.0
    )
    assert lx.is_diagonal(diag) and lx.is_tridiagonal(diag)
    np.testing.assert_allclose(lx.diagonal(diag), np.exp(2.0 * np.linspace(-1, 0, N)))
    with pytest.raises(ValueError, match="real scalar"):
        kx.ExpmLinearOperator(jnp.asarray(LAP), jnp.ones(2))


def _claims_hold(op, dense):
    """Each structure Lineax is told about `op` holds for its dense matrix."""
    hermitian = np.allclose(dense, dense.conj().T, atol=1e-12)
    if lx.is_symmetric(op):
        np.testing.assert_allclose(dense, dense.T, atol=1e-12)
    if lx.is_positive_semidefinite(op):
        assert hermitian
        assert np.min(np.linalg.eigvalsh(dense)) > 0
    return hermitian


def test_positive_definite_only_for_hermitian_operators():
    """exp(tA) is Hermitian positive definite for a Hermitian A (real symmetric, or
    complex with a semidefinite tag), but only complex symmetric for a complex
    symmetric A, which Lineax's symmetric tag means for complex operators."""
    rng = np.random.default_rng(8)
    b = rng.standard_normal((N, N)) + 1j * rng.standard_normal((N, N))
    complex_symmetric = 0.1 * (b + b.T)
    hermitian = -random_hermitian(N, 9) @ random_hermitian(N, 9).conj().T
    matrix = lx.MatrixLinearOperator
    cases = [
        (matrix(jnp.asarray(LAP / 50), lx.symmetric_tag), True),
        (matrix(jnp.asarray(hermitian), lx.negative_semidefinite_tag), True),
        (matrix(jnp.asarray(complex_symmetric), lx.symmetric_tag), False),
    ]
    for operator, positive in cases:
        op = kx.ExpmLinearOperator(operator, 0.5, kx.KrylovExpm(rtol=1e-12))
        dense = scipy.linalg.expm(0.5 * np.asarray(operator.as_matrix()))
        assert lx.is_symmetric(op) == lx.is_symmetric(operator)
        assert lx.is_positive_semidefinite(op) == positive
        assert _claims_hold(op, dense) == positive


@pytest.mark.slow
def test_backward_diffusion_by_linear_solve():
    """Recover an initial condition from the diffused state: solve exp(tA) u0 = uT."""
    op = lx.MatrixLinearOperator(jnp.asarray(LAP), lx.symmetric_tag)
    t = 0.01
    u_t = scipy.linalg.expm(t * LAP) @ U0
    forward = kx.ExpmLinearOperator(op, t, kx.KrylovExpm(rtol=1e-13))
    for solver in (lx.GMRES(rtol=1e-11, atol=1e-11), lx.CG(rtol=1e-11, atol=1e-11)):
        sol = lx.linear_solve(forward, jnp.asarray(u_t), solver)
        assert rel_err(sol.value, U0) < 1e-6


def test_composes_and_differentiates():
    a = jnp.asarray(NONSYM)
    composed = kx.ExpmLinearOperator(a, 0.3) @ kx.ExpmLinearOperator(a, 0.4)
    want = scipy.linalg.expm(0.7 * NONSYM) @ U0
    assert rel_err(composed.mv(jnp.asarray(U0)), want) < 1e-8

    def loss(t):
        return jnp.sum(
            kx.ExpmLinearOperator(a, t, kx.KrylovExpm(rtol=1e-12)).mv(U0) ** 2
        )

    def dense(t):
        return jnp.sum((jax.scipy.linalg.expm(t * a) @ U0) ** 2)

    assert rel_err(jax.grad(loss)(0.5), jax.grad(dense)(0.5)) < 1e-9
