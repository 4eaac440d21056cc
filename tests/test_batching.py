"""`KrylovExpm(batching="batched")`: under `vmap` the whole batch runs in one loop,
each element masked. Every element must get what it gets alone (values, statistics,
result codes, gradients), checked against unbatched solves and dense references."""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
import numpy as np
import pytest

import krylovexp as kx
from support.measure import rel_err
from support.operators import convection_diffusion_1d, laplacian_1d
from support.references import expm_ref, phi_ref


N = 40
NONNORMAL = convection_diffusion_1d(N, velocity=20.0) / 400.0
SYMMETRIC = laplacian_1d(N) / 100.0
RNG = np.random.default_rng(3)
VECTORS = RNG.standard_normal((4, N))
TIMES = np.array([0.3, -0.8, 1.7, 0.0])


def results(sol):
    return [int(r) for r in np.asarray(sol.result._value)]


def batched_and_alone(solver, operator, vectors, times):
    batched = jax.jit(jax.vmap(lambda v, t: solver.expmv(operator, v, t)))(
        vectors, times
    )
    alone = [solver.expmv(operator, v, t) for v, t in zip(vectors, times, strict=True)]
    return batched, alone


@pytest.mark.parametrize(
    "matrix, tag", [(NONNORMAL, ()), (SYMMETRIC, lx.symmetric_tag)]
)
def test_values_and_statistics_equal_unbatched(matrix, tag):
    """Arnoldi and Lanczos, positive, negative and zero times: every element equals
    its own solve to round-off, with the same Krylov dimensions."""
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix), tag)
    solver = kx.KrylovExpm(batching="batched", rtol=1e-10)
    batched, alone = batched_and_alone(
        solver, operator, jnp.asarray(VECTORS), jnp.asarray(TIMES)
    )
    for i, sol in enumerate(alone):
        assert rel_err(batched.value[i], sol.value) < 1e-12
        assert rel_err(batched.value[i], expm_ref(matrix, VECTORS[i], TIMES[i])) < 1e-8
        for key in ("num_matvecs", "num_substeps", "max_krylov_dim"):
            assert int(batched.stats[key][i]) == int(sol.stats[key])
    # The elements really differ in the work they need.
    assert len(set(np.asarray(batched.stats["num_matvecs"]).tolist())) > 1


def test_mixed_outcomes_flag_only_their_element():
    """One element breaks down at once (an eigenvector), one needs many substeps, one
    has a NaN: only the NaN is flagged, the others are exact."""
    eigvals, eigvecs = np.linalg.eigh(SYMMETRIC)
    vectors = np.stack([VECTORS[0], eigvecs[:, 3], VECTORS[1], np.full(N, np.nan)])
    times = np.array([0.5, 0.5, 40.0, 0.5])
    operator = lx.MatrixLinearOperator(jnp.asarray(SYMMETRIC), lx.symmetric_tag)
    solver = kx.KrylovExpm(
        batching="batched", rtol=1e-10, max_krylov_dim=8, throw=False
    )
    batched, alone = batched_and_alone(
        solver, operator, jnp.asarray(vectors), jnp.asarray(times)
    )
    good = int(kx.RESULTS.successful._value)
    bad = int(kx.RESULTS.nonfinite_input._value)
    assert results(batched) == [good, good, good, bad]
    substeps = np.asarray(batched.stats["num_substeps"])
    assert int(batched.stats["max_krylov_dim"][1]) == 1  # the breakdown
    assert substeps[2] > 2 * substeps[0]
    for i in range(3):
        assert rel_err(batched.value[i], alone[i].value) < 1e-12
        assert (
            rel_err(batched.value[i], expm_ref(SYMMETRIC, vectors[i], times[i])) < 1e-8
        )
        assert int(batched.stats["num_matvecs"][i]) == int(
            alone[i].stats["num_matvecs"]
        )
    np.testing.assert_allclose(
        batched.value[1], np.exp(0.5 * eigvals[3]) * eigvecs[:, 3], atol=1e-12
    )


def test_gradients_equal_dense():
    """`grad` of a batch of solves under one operator (the operator's cotangent sums
    the batch) and per-element start vectors, against autodiff of the dense
    exponential."""
    vectors = jnp.asarray(VECTORS[:3])

    def loss(matrix, vectors, batching):
        solver = kx.KrylovExpm(batching=batching, rtol=1e-12)
        values = jax.vmap(lambda v: solver(matrix, v, 0.7))(vectors)
        return jnp.sum(values**2)

    def dense(matrix, vectors):
        return jnp.sum((vectors @ jsl.expm(0.7 * matrix).T) ** 2)

    matrix = jnp.asarray(NONNORMAL)
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
        matrix, vectors, "batched"
    )
    want = jax.grad(dense, argnums=(0, 1))(matrix, vectors)
    for value, reference in zip(got, want, strict=True):
        assert rel_err(value, reference) < 1e-8


@pytest.mark.slow
def test_phimv_batched():
    solver = kx.KrylovExpm(batching="batched", rtol=1e-10)
    operator = jnp.asarray(NONNORMAL)
    stacks = jnp.asarray(RNG.standard_normal((3, 3, N)))
    values = jax.vmap(lambda b: solver.phimv(operator, tuple(b), 0.9).value)(stacks)
    for i in range(3):
        want = phi_ref(NONNORMAL, list(np.asarray(stacks[i])), 0.9)
        assert rel_err(values[i], want) < 1e-8


N_CHUNKED = 4096
CHUNKED_VECTORS = np.random.default_rng(4).standard_normal((3, N_CHUNKED))
CHUNKED_TIMES = np.array([7.5e-8, 2.5e-7, 2.5e-6])  # Krylov dimensions 12, 19, 40


def chunked_solve(kappa, v, t, batching):
    """A periodic 1-D diffusion large enough that bases grow in chunks (8, 16 and 41
    rows)."""

    def matvec(u):
        return kappa * (jnp.roll(u, 1) + jnp.roll(u, -1) - 2 * u) * N_CHUNKED**2

    operator = lx.FunctionLinearOperator(
        matvec, jax.ShapeDtypeStruct((N_CHUNKED,), v.dtype), lx.symmetric_tag
    )
    solver = kx.KrylovExpm(batching=batching, max_krylov_dim=40)
    return solver.expmv(operator, v, t)


def test_chunked_bases_across_capacity_levels():
    """Elements that stop in different chunks of a chunked basis: the same values and
    dimensions as the sequential mode."""

    def solve(batching):
        run = jax.vmap(lambda v, t: chunked_solve(1.0, v, t, batching))
        return jax.jit(run)(jnp.asarray(CHUNKED_VECTORS), jnp.asarray(CHUNKED_TIMES))

    batched, sequential = solve("batched"), solve("sequential")
    dims = np.asarray(batched.stats["max_krylov_dim"])
    assert dims[0] < 16 < dims[1] < 32 < dims[2], dims
    np.testing.assert_array_equal(dims, sequential.stats["max_krylov_dim"])
    assert rel_err(batched.value, sequential.value) < 1e-12


@pytest.mark.slow
def test_chunked_bases_gradient():
    """The gradient in the diffusion coefficient and the start vectors over chunked
    bases of different sizes (backward rebuilds in the kept rows and beyond them)
    equals the sequential mode's."""

    def loss(kappa, vectors, batching):
        run = jax.vmap(lambda v, t: chunked_solve(kappa, v, t, batching).value)
        return jnp.sum(run(vectors, jnp.asarray(CHUNKED_TIMES)) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    vectors = jnp.asarray(CHUNKED_VECTORS)
    batched = grad(1.0, vectors, "batched")
    sequential = grad(1.0, vectors, "sequential")
    for got, want in zip(batched, sequential, strict=True):
        assert rel_err(got, want) < 1e-10


@pytest.mark.slow
def test_groups_of_batch_size():
    """`batch_size=2` over five elements (two groups and a remainder of one): the same
    values and statistics as the whole batch at once."""
    operator = lx.MatrixLinearOperator(jnp.asarray(SYMMETRIC), lx.symmetric_tag)
    vectors = jnp.asarray(np.concatenate([VECTORS, VECTORS[:1]]))
    times = jnp.asarray(np.concatenate([TIMES, [2.5]]))

    def solve(batch_size):
        solver = kx.KrylovExpm(batching="batched", batch_size=batch_size)
        return jax.jit(jax.vmap(lambda v, t: solver.expmv(operator, v, t)))(
            vectors, times
        )

    grouped, whole = solve(2), solve(None)
    assert rel_err(grouped.value, whole.value) < 1e-12
    np.testing.assert_array_equal(
        grouped.stats["num_matvecs"], whole.stats["num_matvecs"]
    )
    assert rel_err(grouped.value[4], expm_ref(SYMMETRIC, VECTORS[0], 2.5)) < 1e-8


def test_bad_batching_options():
    with pytest.raises(ValueError, match="`batching` must be one of"):
        kx.KrylovExpm(batching="parallel")
    with pytest.raises(ValueError, match="`batch_size` must be at least 1"):
        kx.KrylovExpm(batch_size=0)


@pytest.mark.slow
def test_float32_batched_values_and_gradient():
    """Single precision at the default tolerance: finite values and a gradient within
    1e-3 of the float64 ones."""
    vectors = VECTORS[:3]

    def loss(matrix, vectors):
        solver = kx.KrylovExpm(batching="batched")
        values = jax.vmap(lambda v: solver(matrix, v, 0.7))(vectors)
        return jnp.sum(values**2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value32, grads32 = grad(
        jnp.asarray(NONNORMAL, jnp.float32), jnp.asarray(vectors, jnp.float32)
    )
    value64, grads64 = grad(jnp.asarray(NONNORMAL), jnp.asarray(vectors))
    assert value32.dtype == jnp.float32 and np.isfinite(value32)
    assert abs(float(value32) - float(value64)) < 1e-4 * abs(float(value64))
    for got, want in zip(grads32, grads64, strict=True):
        assert got.dtype == jnp.float32
        assert rel_err(got, want) < 1e-3
