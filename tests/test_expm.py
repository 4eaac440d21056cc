"""Values of expmv/phimv against dense SciPy exponentials."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import krylovexp as kx
from support.measure import rel_err, tol
from support.operators import convection_diffusion_1d, laplacian_1d, random_hermitian
from support.references import expm_ref, phi_ref
from support.solve import expmv_solution, phimv_solution


def symmetric_op(matrix):
    return lx.MatrixLinearOperator(jnp.asarray(matrix), lx.symmetric_tag)


N = 40
V = np.random.default_rng(0).standard_normal(N)
NONNORMAL = convection_diffusion_1d(N, velocity=20.0) / 400.0  # ||A|| ~ 10


@pytest.mark.parametrize(
    "dtype",
    [
        jnp.float32,
        jnp.float64,
        pytest.param(jnp.complex64, marks=pytest.mark.slow),
        jnp.complex128,
    ],
)
def test_nonnormal_all_dtypes(dtype):
    matrix = NONNORMAL.astype(dtype)
    vector = V.astype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        matrix = (matrix + 1j * random_hermitian(N, 1)).astype(dtype)
        vector = (vector + 1j * V[::-1]).astype(dtype)
    sol = expmv_solution(kx.KrylovExpm(), jnp.asarray(matrix), jnp.asarray(vector), 1.5)
    assert sol.value.dtype == dtype
    assert sol.result == kx.RESULTS.successful
    assert rel_err(sol.value, expm_ref(matrix, vector, 1.5)) < 10 * tol(dtype)


@pytest.mark.parametrize(
    "method", ["auto", "lanczos", pytest.param("arnoldi", marks=pytest.mark.slow)]
)
def test_symmetric_tagged(method):
    matrix = laplacian_1d(N, 3.0) + np.diag(np.linspace(0, 1, N))
    sol = expmv_solution(kx.KrylovExpm(method=method), symmetric_op(matrix), V, 2.0)
    assert rel_err(sol.value, expm_ref(matrix, V, 2.0)) < 1e-8


@pytest.mark.parametrize(
    "method", ["auto", pytest.param("arnoldi", marks=pytest.mark.slow)]
)
def test_complex_hermitian_tagged(method):
    h = random_hermitian(N, 2)
    matrix = -(h @ h.conj().T)  # negative semidefinite Hermitian: Lanczos in "auto"
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), lx.negative_semidefinite_tag)
    vector = (V + 1j * V[::-1]).astype(complex)
    sol = expmv_solution(kx.KrylovExpm(method=method), op, vector, 3.0)
    assert rel_err(sol.value, expm_ref(matrix, vector, 3.0)) < 1e-8


@pytest.mark.parametrize("method", ["lanczos", "arnoldi"])
def test_schrodinger_skew_hermitian(method):
    """exp(-i t H) psi: unitary, so the norm is preserved."""
    h = random_hermitian(N, 3) * 5
    psi = (V + 1j * V[::-1]) / np.linalg.norm(V) / np.sqrt(2)
    op = lx.MatrixLinearOperator(jnp.asarray(-1j * h))
    sol = expmv_solution(kx.KrylovExpm(method=method, rtol=1e-10), op, psi, 4.0)
    assert rel_err(sol.value, expm_ref(-1j * h, psi, 4.0)) < 1e-9
    assert abs(np.linalg.norm(sol.value) - 1.0) < 1e-9


def test_pytree_function_operator():
    """A coupled system on a dict state, given as a matrix-free function."""
    a = NONNORMAL[:10, :10]
    b = laplacian_1d(6, 2.0)
    c = np.random.default_rng(1).standard_normal((10, 6)) * 0.3

    def fn(x):
        u, w = x["u"], x["w"]
        return {"u": a @ u + c @ w.reshape(-1), "w": (b @ w.reshape(-1)).reshape(2, 3)}

    structure = {
        "u": jax.ShapeDtypeStruct((10,), jnp.float64),
        "w": jax.ShapeDtypeStruct((2, 3), jnp.float64),
    }
    op = lx.FunctionLinearOperator(fn, structure)
    x = {"u": jnp.asarray(V[:10]), "w": jnp.asarray(V[10:16]).reshape(2, 3)}
    out = kx.expmv(op, x, 0.7)
    dense = np.block([[a, c], [np.zeros((6, 10)), b]])
    ref = expm_ref(dense, V[:16], 0.7)
    assert out["w"].shape == (2, 3)
    assert rel_err(np.concatenate([out["u"], out["w"].reshape(-1)]), ref) < 1e-8


def test_jacobian_diagonal_and_composed_operators():
    y = jnp.asarray(V[:20])
    a = jnp.asarray(NONNORMAL[:20, :20])
    jac = lx.JacobianLinearOperator(lambda y, args: a @ y + jnp.sin(y), y)
    dense = np.asarray(a) + np.diag(np.cos(V[:20]))
    assert rel_err(kx.expmv(jac, y, 0.5), expm_ref(dense, V[:20], 0.5)) < 1e-8
    d = jnp.linspace(-3.0, 0.0, 20)
    diag = lx.DiagonalLinearOperator(d)
    assert rel_err(kx.expmv(diag, y, 1.0), np.exp(np.asarray(d)) * V[:20]) < 1e-8
    composed = 0.5 * lx.MatrixLinearOperator(a) + diag
    ref = expm_ref(0.5 * np.asarray(a) + np.diag(np.asarray(d)), V[:20], 1.0)
    assert rel_err(kx.expmv(composed, y, 1.0), ref) < 1e-8


@pytest.mark.parametrize(
    "p",
    [
        pytest.param(p, marks=pytest.mark.slow) if p in (0, 2, 4) else p
        for p in range(5)
    ],
)
def test_phimv_against_augmented_identity(p):
    rng = np.random.default_rng(2)
    vectors = tuple(jnp.asarray(rng.standard_normal(N)) for _ in range(p + 1))
    sol = phimv_solution(
        kx.KrylovExpm(rtol=1e-10), jnp.asarray(NONNORMAL), vectors, 0.8
    )
    ref = phi_ref(NONNORMAL, vectors, 0.8)
    assert rel_err(sol.value, ref) < 1e-9


def test_phimv_symmetric_lanczos_and_time_grid():
    matrix = laplacian_1d(N, 100.0)
    rng = np.random.default_rng(3)
    vectors = tuple(jnp.asarray(rng.standard_normal(N)) for _ in range(3))
    times = jnp.array([0.0, 0.01, 0.05, 0.2])
    for method in ("auto", "lanczos"):
        solver = kx.KrylovExpm(method=method, rtol=1e-10)
        out = phimv_solution(solver, symmetric_op(matrix), vectors, times).value
        for i, t in enumerate(np.asarray(times)):
            ref = phi_ref(matrix, vectors, t)
            assert rel_err(out[i], ref) < 1e-8, (method, t)


@pytest.mark.slow
def test_lanczos_forced_on_nonnormal_operator():
    """`method="lanczos"` on a non-normal operator is the incomplete orthogonalisation
    of KIOPS (window 2): the basis is not orthonormal, but the a-posteriori estimate
    still controls every substep, so the value meets the tolerance, at a higher
    matvec count than Arnoldi's (documented in the FAQ)."""
    matrix = convection_diffusion_1d(N, velocity=100.0)  # ||A|| ~ 1e4, non-normal
    t = 0.01
    vector = jnp.asarray(V)
    ref = expm_ref(matrix, V, t)
    # (`KrylovExpm()` picks Arnoldi for an untagged matrix, and its compiled solve is
    # shared with test_nonnormal_all_dtypes.)
    solutions = {
        "lanczos": expmv_solution(
            kx.KrylovExpm(method="lanczos"), jnp.asarray(matrix), vector, t
        ),
        "arnoldi": expmv_solution(kx.KrylovExpm(), jnp.asarray(matrix), vector, t),
    }
    for sol in solutions.values():
        assert sol.result == kx.RESULTS.successful
        err = np.linalg.norm(np.asarray(sol.value) - ref) / np.linalg.norm(V)
        assert err <= 1e-8
    lanczos, arnoldi = (int(solutions[m].stats["num_matvecs"]) for m in solutions)
    assert lanczos > arnoldi


@pytest.mark.parametrize(
    "stiffness",
    [
        pytest.param(1e3, marks=pytest.mark.slow),
        pytest.param(1e4, marks=pytest.mark.slow),
        1e5,
    ],
)
def test_stiff_symmetric_meets_tolerance(stiffness):
    n = 150
    matrix = laplacian_1d(n, (n + 1) ** 2)  # 1-D heat equation on (0, 1)
    t = stiffness / np.linalg.norm(matrix, 2)
    x = np.linspace(0, 1, n + 2)[1:-1]
    u0 = np.exp(-40 * (x - 0.4) ** 2) + x * (1 - x)
    for rtol in (1e-6, 1e-10):
        solver = kx.KrylovExpm(rtol=rtol, max_substeps=500)
        sol = expmv_solution(solver, symmetric_op(matrix), jnp.asarray(u0), t)
        ref = expm_ref(matrix, u0, t)
        err = np.linalg.norm(np.asarray(sol.value) - ref) / np.linalg.norm(u0)
        assert sol.result == kx.RESULTS.successful
        assert err <= rtol, (stiffness, rtol, err)
        # The reported estimate meets the target and bounds the error it estimates.
        estimate = float(sol.stats["error_estimate"]) / np.linalg.norm(u0)
        assert estimate <= rtol and err <= 2 * estimate, (err, estimate)
        # The statistics are consistent with each other.
        dims = np.asarray(sol.stats["krylov_dims"])
        substeps = int(sol.stats["num_substeps"])
        assert np.count_nonzero(dims) == substeps and np.all(dims[substeps:] == 0)
        assert int(sol.stats["num_matvecs"]) == int(np.sum(dims))
        assert int(sol.stats["max_krylov_dim"]) == int(np.max(dims)) <= 100


def test_stiff_nonnormal_meets_tolerance():
    n = 100
    matrix = convection_diffusion_1d(n, velocity=100.0)
    t = 2e3 / np.linalg.norm(matrix, 2)
    u0 = np.sin(np.pi * np.linspace(0, 1, n)) + 0.1
    sol = expmv_solution(
        kx.KrylovExpm(rtol=1e-8), jnp.asarray(matrix), jnp.asarray(u0), t
    )
    ref = expm_ref(matrix, u0, t)
    assert np.linalg.norm(np.asarray(sol.value) - ref) / np.linalg.norm(u0) <= 1e-8
    assert int(sol.stats["num_substeps"]) > 1


def test_zero_negative_and_grid_times():
    a = jnp.asarray(NONNORMAL)
    np.testing.assert_allclose(kx.expmv(a, V, 0.0), V, rtol=0, atol=1e-14)
    assert rel_err(kx.expmv(a, V, -0.3), expm_ref(NONNORMAL, V, -0.3)) < 1e-8
    for times in ([0.0, 0.1, 0.1, 0.5, 2.0], [-0.05, -0.2]):
        out = expmv_solution(
            kx.KrylovExpm(), a, jnp.asarray(V), jnp.asarray(times)
        ).value
        assert out.shape == (len(times), N)
        for i, t in enumerate(times):
            assert rel_err(out[i], expm_ref(NONNORMAL, V, t)) < 1e-8


def test_repeated_final_time_values_and_gradients():
    # Every output at the final time is the sweep's end value (no small exponential
    # of its own); values, and gradients in the vector and the times, against the
    # dense references (central differences of the dense phi reference for `t`).
    rng = np.random.default_rng(5)
    vectors = tuple(jnp.asarray(rng.standard_normal(N)) for _ in range(3))
    times = jnp.array([0.2, 0.8, 0.8, 0.8])
    solver = kx.KrylovExpm(rtol=1e-10)
    out = solver.phimv(jnp.asarray(NONNORMAL), vectors, times).value
    for i, t in enumerate(np.asarray(times)):
        assert rel_err(out[i], phi_ref(NONNORMAL, vectors, t)) < 1e-9, i
    np.testing.assert_array_equal(out[1], out[3])

    weights = jnp.asarray(rng.standard_normal((4, N)))

    def loss(b1, times):
        sweep = solver.phimv(
            jnp.asarray(NONNORMAL), (vectors[0], b1, vectors[2]), times
        )
        return jnp.sum(weights * sweep.value)

    b1_bar, times_bar = jax.grad(loss, argnums=(0, 1))(vectors[1], times)
    # d/d b_1 of sum_i w_i . t_i phi_1(t_i A) b_1 = sum_i t_i phi_1(t_i A)^T w_i.
    expected = sum(
        phi_ref(NONNORMAL.T, (np.zeros(N), np.asarray(weights[i])), t)
        for i, t in enumerate(np.asarray(times))
    )
    assert rel_err(b1_bar, expected) < 1e-8
    step = 1e-6
    for i, t in enumerate(np.asarray(times)):
        up = phi_ref(NONNORMAL, vectors, t + step)
        down = phi_ref(NONNORMAL, vectors, t - step)
        rate = (up - down) / (2 * step)
        np.testing.assert_allclose(
            times_bar[i], np.dot(np.asarray(weights[i]), rate), rtol=1e-6
        )


@pytest.mark.slow
def test_happy_breakdown():
    """v in a 3-dimensional invariant subspace: the Krylov space is exhausted."""
    rng = np.random.default_rng(4)
    block = rng.standard_normal((3, 3))
    matrix = np.zeros((N, N))
    matrix[:3, :3] = block
    matrix[3:, 3:] = NONNORMAL[3:, 3:]
    vector = np.zeros(N)
    vector[:3] = rng.standard_normal(3)
    sol = expmv_solution(kx.KrylovExpm(), jnp.asarray(matrix), jnp.asarray(vector), 2.0)
    assert int(sol.stats["max_krylov_dim"]) == 3
    assert rel_err(sol.value, expm_ref(matrix, vector, 2.0)) < 1e-13
    # an eigenvector, and the zero vector
    eigvec = np.zeros(N)
    eigvec[0] = 1.0
    diag = np.diag(np.linspace(-1, 0, N))
    out = kx.expmv(jnp.asarray(diag), jnp.asarray(eigvec), 1.5)
    np.testing.assert_allclose(out, np.exp(-1.5) * eigvec, atol=1e-15)
    zero = kx.expmv(jnp.asarray(diag), jnp.zeros(N), 1.5)
    assert np.all(np.asarray(zero) == 0)


def test_vmap_over_vectors_times_and_parameters():
    a = jnp.asarray(NONNORMAL)
    vs = jnp.asarray(np.random.default_rng(5).standard_normal((3, N)))
    ts = jnp.array([0.1, 0.7, 1.3])
    scales = jnp.array([0.5, 1.0, 2.0])

    @jax.jit
    @jax.vmap
    def batched(v, t, s):
        return kx.expmv(s * a, v, t, rtol=1e-10)

    out = batched(vs, ts, scales)
    for i in range(3):
        ref = expm_ref(float(scales[i]) * NONNORMAL, vs[i], float(ts[i]))
        assert rel_err(out[i], ref) < 1e-8


def test_solution_stats_and_corrected_flag():
    a = jnp.asarray(NONNORMAL)
    corrected = expmv_solution(kx.KrylovExpm(rtol=1e-6), a, jnp.asarray(V), 1.0)
    plain = expmv_solution(
        kx.KrylovExpm(rtol=1e-6, corrected=False), a, jnp.asarray(V), 1.0
    )
    ref = expm_ref(NONNORMAL, V, 1.0)
    err_plain = np.linalg.norm(np.asarray(plain.value) - ref)
    err_corrected = np.linalg.norm(np.asarray(corrected.value) - ref)
    # the estimate bounds the plain error (to a safety factor), the correction helps
    assert err_plain <= 3 * float(plain.stats["error_estimate"])
    assert err_corrected < err_plain
    assert int(corrected.stats["num_matvecs"]) == int(
        np.sum(corrected.stats["krylov_dims"])
    )
