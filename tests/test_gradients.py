"""Reverse- and forward-mode derivatives against autodiff of the dense exponential,
central finite differences, differentiation through the loop, and matfree."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
import numpy as np
import pytest

import krylovexp as kx
from support.measure import rel_err
from support.operators import convection_diffusion_1d, laplacian_1d, random_hermitian
from support.peers import matfree_expm
from support.problems import variable_diffusion_problem
from support.references import periodic_convection_diffusion


N = 30
_rng = np.random.default_rng(1)  # module data only, drawn once at import
A = jnp.asarray(convection_diffusion_1d(N, velocity=20.0) / 300.0)
V = jnp.asarray(_rng.standard_normal(N))
AC = A + 1j * jnp.asarray(random_hermitian(N, 4))
VC = V + 1j * jnp.asarray(_rng.standard_normal(N))
del _rng


def loss_krylov(matrix, vector, t, **options):
    u = kx.expmv(matrix, vector, t, rtol=1e-12, **options)
    return jnp.sum(jnp.abs(u) ** 2) + jnp.sum(jnp.real(u) * jnp.arange(N))


def loss_dense(matrix, vector, t):
    u = jsl.expm(t * matrix) @ vector
    return jnp.sum(jnp.abs(u) ** 2) + jnp.sum(jnp.real(u) * jnp.arange(N))


grad_krylov = jax.jit(jax.grad(loss_krylov, argnums=(0, 1, 2)))
grad_dense = jax.jit(jax.grad(loss_dense, argnums=(0, 1, 2)))


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("t", [0.8, -0.4, 0.0])
def test_grad_matches_dense_autodiff(complex_, t):
    matrix, vector = (AC, VC) if complex_ else (A, V)
    got = grad_krylov(matrix, vector, t)
    want = grad_dense(matrix, vector, t)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-9


LOOSE = dict(rtol=1e-4, max_krylov_dim=6)  # several substeps


def _loss_loose(matrix, vector, t, adjoint):
    u = kx.expmv(matrix, vector, t, adjoint=adjoint, **LOOSE)
    return jnp.sum(jnp.abs(u) ** 2)


def test_grad_agrees_with_differentiating_through_the_loop():
    """mode="approximation" is the exact derivative of the computed approximation, at
    a loose tolerance with several substeps (the default, the gradient of the exact
    solution, is checked against the dense exponential by
    `test_grad_matches_dense_autodiff`)."""
    grad = jax.jit(jax.grad(_loss_loose, argnums=(0, 1, 2)), static_argnums=3)
    exact_derivative = kx.KrylovAdjoint(mode="approximation")
    # Complex only: it exercises every path of the real case (one compiled program
    # per adjoint; the suite's time is mostly compilation).
    custom = grad(AC, VC, 1.5, exact_derivative)
    direct = grad(AC, VC, 1.5, kx.DirectAdjoint())
    for a, b in zip(custom, direct, strict=True):
        assert rel_err(a, b) < 1e-11


def _stiff_laplacian(n=60):
    lap = jnp.asarray(laplacian_1d(n, (n + 1) ** 2))
    x = jnp.linspace(0, 1, n)
    return lap, x


@pytest.mark.slow
def test_vector_cotangent_is_exact_adjoint_for_stiff_operators():
    """For a stiff operator the derivative of the Krylov approximation with respect to
    v is wrong (its polynomial does not damp rough directions); the default gives
    exp(t A^T) ū to the tolerance."""
    lap, x = _stiff_laplacian()
    op = lx.MatrixLinearOperator(lap, lx.symmetric_tag)
    u0 = jnp.exp(-40 * (x - 0.5) ** 2)
    t = 0.02  # ||tA|| ~ 300
    exact = 2 * jsl.expm(t * lap).T @ (jsl.expm(t * lap) @ u0)

    def loss(v, adjoint):
        return jnp.sum(kx.expmv(op, v, t, rtol=1e-10, adjoint=adjoint) ** 2)

    default = jax.grad(loss)(u0, kx.KrylovAdjoint())
    derivative = jax.grad(loss)(u0, kx.KrylovAdjoint(mode="approximation"))
    assert rel_err(default, exact) < 1e-8
    assert rel_err(derivative, exact) > 1e-6  # the failure mode the default avoids


def _stiff_local_problem(method):
    """A stiff operator with one parameter per grid node, a smooth start vector and
    sensor-like observations (the problem of benchmarks/gradient_accuracy.py,
    smaller): the loss, and the gradient by autodiff of the dense exponential."""
    problem = variable_diffusion_problem(n=80, T=0.01)  # ||TA|| ~ 350
    u0, t = problem.u0, problem.T

    def loss(theta, adjoint):
        op = problem.operator(theta)
        u = kx.expmv(op, u0, t, rtol=1e-8, method=method, adjoint=adjoint)
        return problem.observe(u)

    def dense(theta):
        return problem.observe(jsl.expm(t * problem.matrix(theta)) @ u0)

    return problem, loss, jax.grad(dense)(problem.theta)


@pytest.mark.parametrize(
    "method", [pytest.param("arnoldi", marks=pytest.mark.slow), "lanczos"]
)
def test_grad_stiff_local_parameters(method):
    """The case that motivated the default: the default gradient matches autodiff of
    the dense exponential to the tolerance (the derivative of the Krylov
    approximation is off by orders of magnitude more: see the next test)."""
    problem, loss, want = _stiff_local_problem(method)
    got = jax.grad(loss)(problem.theta, kx.KrylovAdjoint())
    assert rel_err(got, want) < 1e-6


@pytest.mark.slow
def test_stiff_local_parameters_approximation_and_forward_mode():
    """On the same problem the derivative of the approximation is far above the
    tolerance of the value, and forward mode of the default adjoint is the tangent of
    the exact solution."""
    problem, loss, want = _stiff_local_problem("lanczos")
    theta = problem.theta
    error = rel_err(jax.grad(loss)(theta, kx.KrylovAdjoint()), want)
    derivative = jax.grad(loss)(theta, kx.KrylovAdjoint(mode="approximation"))
    assert rel_err(derivative, want) > max(1e-4, 100 * error), error
    direction = jnp.cos(11 * problem.x)
    _, tangent = jax.jvp(
        lambda th: loss(th, kx.KrylovAdjoint()), (theta,), (direction,)
    )
    assert rel_err(tangent, want @ direction) < 1e-6


@pytest.mark.slow
def test_grad_schrodinger_local_potential():
    """Complex gradients of the default adjoint: `exp(-i t (L + diag V(θ))) ψ` with a
    potential per node, against autodiff of the dense exponential."""
    lap, x = _stiff_laplacian(50)
    psi = jnp.exp(-30 * (x - 0.5) ** 2 + 8j * x).astype(jnp.complex128)
    theta = 50 * jnp.cos(4 * x)
    t = 0.01  # ||tH|| ~ 100

    def hamiltonian(theta):
        return -0.5 * lap + jnp.diag(theta)

    def observe(u):
        return jnp.sum(jnp.abs(u[::3]) ** 2) + jnp.sum(jnp.real(u) * x)

    def loss(theta):
        op = lx.MatrixLinearOperator(-1j * hamiltonian(theta))
        return observe(kx.expmv(op, psi, t, rtol=1e-10))

    def dense(theta):
        return observe(jsl.expm(-1j * t * hamiltonian(theta)) @ psi)

    assert rel_err(jax.grad(loss)(theta), jax.grad(dense)(theta)) < 1e-7


@pytest.mark.slow
def test_grad_stiff_substeps_and_lanczos():
    n = 40
    lap = laplacian_1d(n, (n + 1) ** 2)
    u0 = jnp.asarray(np.sin(np.linspace(0, 3, n)) ** 2)
    t = 2e3 / np.linalg.norm(lap, 2)

    def loss(kappa, u0, op_fn):
        return jnp.sum(
            kx.expmv(op_fn(kappa), u0, t, rtol=1e-12, max_krylov_dim=20) ** 2
        )

    def tagged(kappa):
        return lx.MatrixLinearOperator(kappa * jnp.asarray(lap), lx.symmetric_tag)

    def dense(kappa, u0):
        return jnp.sum((jsl.expm(t * kappa * jnp.asarray(lap)) @ u0) ** 2)

    got = jax.grad(loss, argnums=(0, 1))(1.3, u0, tagged)
    want = jax.grad(dense, argnums=(0, 1))(1.3, u0)
    assert rel_err(got[0], want[0]) < 1e-8
    assert rel_err(got[1], want[1]) < 1e-8
    sol = kx.KrylovExpm(rtol=1e-12, max_krylov_dim=20).expmv(tagged(1.3), u0, t)
    assert int(sol.stats["num_substeps"]) > 3


class Diffusion(lx.FunctionLinearOperator):
    pass


@pytest.mark.slow
def test_grad_reaches_closed_over_arrays_and_fields_fd():
    """A matrix-free operator whose parameter is closed over, and a custom Module
    operator with the parameter as a field; checked by central differences."""
    n = 25
    h = 1.0 / (n + 1)

    def apply(kappa, u):
        up = jnp.pad(u, 1)
        flux = kappa * (up[1:] - up[:-1]) / h  # kappa on the n + 1 cell faces
        return (flux[1:] - flux[:-1]) / h

    structure = jax.ShapeDtypeStruct((n,), jnp.float64)
    u0 = jnp.asarray(np.exp(-30 * (np.linspace(0, 1, n) - 0.3) ** 2))

    def loss_closure(theta):
        op = lx.FunctionLinearOperator(
            lambda u: apply(jnp.exp(theta), u), structure, lx.symmetric_tag
        )
        return jnp.sum(kx.expmv(op, u0, 0.01, rtol=1e-12) ** 3)

    class FaceDiffusion(lx.AbstractLinearOperator):
        theta: jax.Array

        def mv(self, u):
            return apply(jnp.exp(self.theta), u)

        def as_matrix(self):
            return jax.jacfwd(self.mv)(u0)

        def transpose(self):
            return self

        def in_structure(self):
            return structure

        def out_structure(self):
            return structure

    @lx.is_symmetric.register(FaceDiffusion)
    def _(op):
        return True

    @lx.linearise.register(FaceDiffusion)
    def _(op):
        return op

    def loss_field(theta):
        return jnp.sum(kx.expmv(FaceDiffusion(theta), u0, 0.01, rtol=1e-12) ** 3)

    theta = jnp.asarray(np.cos(np.linspace(0, 2, n + 1)))
    direction = jnp.asarray(np.random.default_rng(2).standard_normal(n + 1))
    eps = 1e-5
    for loss in (loss_closure, loss_field):
        fd = (loss(theta + eps * direction) - loss(theta - eps * direction)) / (2 * eps)
        g = jax.grad(loss)(theta)
        assert abs(float(g @ direction) - float(fd)) < 1e-7 * abs(float(fd))


def _phi_dense(matrix, bs, t):
    """`Σ_j t^j φ_j(tA) b_j` by the augmented-matrix identity and a dense `expm`
    (differentiable by JAX)."""
    n, p = matrix.shape[0], len(bs) - 1
    w = jnp.stack(bs[:0:-1], axis=1)
    big = jnp.block(
        [[matrix, w], [jnp.zeros((p, n), w.dtype), jnp.eye(p, k=1, dtype=w.dtype)]]
    )
    start = jnp.concatenate([bs[0], jnp.eye(p, dtype=w.dtype)[-1]])
    return (jsl.expm(t * big) @ start)[:n]


def _observe(u):
    """A real loss of a real or complex vector that sees both parts."""
    return jnp.sum(jnp.sin(jnp.real(u))) + jnp.sum(jnp.abs(u) ** 2)


@pytest.mark.slow
def test_grad_phimv_against_augmented_dense():
    rng = np.random.default_rng(3)
    bs = tuple(jnp.asarray(rng.standard_normal(N)) for _ in range(4))

    def dense(matrix, bs, t):
        return _observe(_phi_dense(matrix, bs, t))

    def krylov(matrix, bs, t):
        return _observe(kx.phimv(matrix, bs, t, rtol=1e-12))

    got = jax.grad(krylov, argnums=(0, 1, 2))(A, bs, 0.6)
    want = jax.grad(dense, argnums=(0, 1, 2))(A, bs, 0.6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < 1e-9


@pytest.mark.slow
def test_grad_phimv_complex():
    """Complex operator and vectors: value and gradients (operator, vectors, t)."""
    rng = np.random.default_rng(4)
    bs = tuple(
        jnp.asarray(rng.standard_normal(N) + 1j * rng.standard_normal(N))
        for _ in range(3)
    )

    def dense(matrix, bs, t):
        return _observe(_phi_dense(matrix, bs, t))

    def krylov(matrix, bs, t):
        return _observe(kx.phimv(matrix, bs, t, rtol=1e-12))

    value = kx.phimv(AC, bs, 0.7, rtol=1e-12)
    assert rel_err(value, _phi_dense(AC, bs, 0.7)) < 1e-10
    got = jax.grad(krylov, argnums=(0, 1, 2))(AC, bs, 0.7)
    want = jax.grad(dense, argnums=(0, 1, 2))(AC, bs, 0.7)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < 1e-9


@pytest.mark.parametrize(
    "mode", ["solution", pytest.param("approximation", marks=pytest.mark.slow)]
)
def test_grad_phimv_lanczos(mode):
    """φ-functions of a symmetric operator with `method="lanczos"` (Lanczos with the
    augmented head, as KIOPS): gradients with respect to a scale of the operator, the
    vectors and t, against dense autodiff."""
    lap = jnp.asarray(laplacian_1d(N, 50.0))
    rng = np.random.default_rng(5)
    bs = tuple(jnp.asarray(rng.standard_normal(N)) for _ in range(3))
    solver = kx.KrylovExpm(
        method="lanczos", rtol=1e-12, adjoint=kx.KrylovAdjoint(mode=mode)
    )

    def krylov(scale, bs, t):
        op = lx.MatrixLinearOperator(scale * lap, lx.symmetric_tag)
        return _observe(solver.phimv(op, bs, t).value)

    def dense(scale, bs, t):
        return _observe(_phi_dense(scale * lap, bs, t))

    got = jax.grad(krylov, argnums=(0, 1, 2))(1.3, bs, 0.4)
    want = jax.grad(dense, argnums=(0, 1, 2))(1.3, bs, 0.4)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) < 1e-9


def test_grad_time_grid():
    times = jnp.array([0.1, 0.4, 0.4, 1.0])

    def krylov(times):
        return jnp.sum(
            jnp.sin(kx.expmv(A, V, times, rtol=1e-12)) * jnp.arange(4.0)[:, None]
        )

    def dense(times):
        out = jnp.stack([jsl.expm(t * A) @ V for t in times])
        return jnp.sum(jnp.sin(out) * jnp.arange(4.0)[:, None])

    assert rel_err(jax.grad(krylov)(times), jax.grad(dense)(times)) < 1e-9


@pytest.mark.parametrize(
    "mode", ["solution", pytest.param("approximation", marks=pytest.mark.slow)]
)
def test_grad_many_substeps_beyond_checkpoint_slots(mode):
    """37 substeps over a time grid with 16 checkpoint slots: the forward pass keeps
    every 4th substep start and the backward pass recomputes the others. The
    gradients (operator, vector, times) still match dense autodiff."""
    times = jnp.array([0.3, 0.7, 1.5])
    solver = kx.KrylovExpm(
        method="arnoldi",
        rtol=1e-10,
        max_krylov_dim=8,
        max_substeps=40,
        adjoint=kx.KrylovAdjoint(mode=mode),
    )
    weights = jnp.arange(1.0, 4.0)[:, None]

    def krylov(matrix, vector, times):
        return jnp.sum(jnp.sin(solver(matrix, vector, times)) * weights)

    def dense(matrix, vector, times):
        out = jnp.stack([jsl.expm(t * matrix) @ vector for t in times])
        return jnp.sum(jnp.sin(out) * weights)

    substeps = int(solver.expmv(A, V, times).stats["num_substeps"])
    assert 32 < substeps < 40
    got = jax.grad(krylov, argnums=(0, 1, 2))(A, V, times)
    want = jax.grad(dense, argnums=(0, 1, 2))(A, V, times)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-7


@pytest.mark.parametrize("max_substeps", [2000, 300])
def test_grad_bisection_restarts_within_long_segments(max_substeps):
    """About 180 substeps against 16 checkpoint slots: the stride reaches 16 and the
    backward pass recomputes each segment's starts by bisection from its checkpoint
    (a stack of log2(stride) starts; room for 6 with `max_substeps=300`, for 8 with
    2000). Gradients match dense autodiff; a start recomputed from the wrong substep
    would not."""
    times = jnp.array([0.4, 1.3, 2.0])
    solver = kx.KrylovExpm(
        method="arnoldi", rtol=1e-10, max_krylov_dim=6, max_substeps=max_substeps
    )
    weights = jnp.arange(1.0, 4.0)[:, None]

    def krylov(matrix, vector):
        return jnp.sum(jnp.sin(solver(matrix, vector, times)) * weights)

    def dense(matrix, vector):
        out = jnp.stack([jsl.expm(t * matrix) @ vector for t in times])
        return jnp.sum(jnp.sin(out) * weights)

    substeps = int(solver.expmv(A, V, times).stats["num_substeps"])
    assert 128 < substeps < 256
    got = jax.grad(krylov, argnums=(0, 1))(A, V)
    want = jax.grad(dense, argnums=(0, 1))(A, V)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-8


def test_grad_breakdown_is_finite_and_exact():
    """v stays in an invariant subspace of A(theta) for every theta: the Krylov space
    is exhausted at dimension 3, values and gradients are exact (no division by the
    vanishing subdiagonal entry)."""
    rng = np.random.default_rng(6)
    block = jnp.asarray(rng.standard_normal((3, 3)))
    rest = A[3:, 3:]

    def matrix(theta):
        top = jnp.concatenate([theta[0] * block, jnp.zeros((3, N - 3))], axis=1)
        bottom = jnp.concatenate([jnp.zeros((N - 3, 3)), theta[1] * rest], axis=1)
        return jnp.concatenate([top, bottom])

    v = jnp.zeros(N).at[:3].set(jnp.asarray(rng.standard_normal(3)))

    def krylov(theta, v):
        return jnp.sum(kx.expmv(matrix(theta), v, 1.2) ** 2)

    def dense(theta, v):
        return jnp.sum((jsl.expm(1.2 * matrix(theta)) @ v) ** 2)

    theta = jnp.array([0.7, 1.1])
    got = jax.grad(krylov)(theta, v)
    want = jax.grad(dense)(theta, v)
    assert np.all(np.isfinite(got))
    assert rel_err(got, want) < 1e-12
    assert abs(float(got[1])) < 1e-14


@pytest.mark.slow
def test_grad_matches_matfree_at_fixed_dimension():
    """Same Krylov dimension, plain (uncorrected) approximation, one substep: the
    gradient equals that of matfree's funm_arnoldi with its own custom adjoint."""
    k = 12
    fixed = kx.KrylovExpm(
        min_krylov_dim=k,
        max_krylov_dim=k,
        rtol=1e6,
        corrected=False,
        adjoint=kx.KrylovAdjoint(mode="approximation"),
    )

    def ours(matrix, v):
        return jnp.sum(jnp.sin(fixed(matrix, v, 1.0)))

    funm = matfree_expm(k)

    def theirs(matrix, v):
        return jnp.sum(jnp.sin(funm(lambda x, m: m @ x, v, matrix)))

    a = 3 * A  # far from converged at k = 12, so the comparison is sharp
    assert rel_err(ours(a, V), theirs(a, V)) < 1e-11
    got = jax.grad(ours, argnums=(0, 1))(a, V)
    want = jax.grad(theirs, argnums=(0, 1))(a, V)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-9


@pytest.mark.slow
def test_forward_mode_with_direct_adjoint():
    def krylov(s):
        return kx.expmv(s * A, V, 0.9, adjoint=kx.DirectAdjoint(), rtol=1e-12)

    def dense(s):
        return jsl.expm(0.9 * s * A) @ V

    _, tangent = jax.jvp(krylov, (1.2,), (1.0,))
    _, want = jax.jvp(dense, (1.2,), (1.0,))
    assert rel_err(tangent, want) < 1e-9
    jac = jax.jacfwd(
        lambda v: kx.expmv(A, v, 0.5, adjoint=kx.DirectAdjoint(), rtol=1e-12)
    )(V)
    assert rel_err(jac, jsl.expm(0.5 * A)) < 1e-9


@pytest.mark.parametrize(
    "complex_", [pytest.param(False, marks=pytest.mark.slow), True]
)
def test_forward_mode_with_custom_adjoint(complex_):
    """The default adjoint's forward mode (the block-exponential tangent of the exact
    solution) against forward-mode autodiff of the dense exponential: a joint
    tangent of the operator, the vector and the time, and `jacfwd` in the vector."""
    matrix, vector = (AC, VC) if complex_ else (A, V)
    rng = np.random.default_rng(7)
    direction = jnp.asarray(rng.standard_normal(matrix.shape), matrix.dtype)
    primals = (matrix, vector, 0.8)
    tangents = (direction, vector[::-1], 0.3)
    krylov = jax.jit(lambda m, v, t: kx.expmv(m, v, t, rtol=1e-12))
    value, tangent = jax.jvp(krylov, primals, tangents)
    _, want = jax.jvp(lambda m, v, t: jsl.expm(t * m) @ v, primals, tangents)
    assert rel_err(value, jsl.expm(0.8 * matrix) @ vector) < 1e-10
    assert rel_err(tangent, want) < 1e-9
    jac = jax.jacfwd(lambda v: krylov(matrix, v, -0.5), holomorphic=complex_)(vector)
    assert rel_err(jac, jsl.expm(-0.5 * matrix)) < 1e-9


def test_forward_mode_phimv_and_second_order_message():
    """`phimv` tangents in the operator and in `b_1`, against the augmented dense
    identity; second derivatives in forward mode name `DirectAdjoint`."""
    b = (V, jnp.cos(V), jnp.sin(V))

    def dense(matrix, b1):
        W = jnp.stack([b[2], b1], axis=1)
        augmented = jnp.block([[matrix, W], [jnp.zeros((2, N)), jnp.eye(2, k=1)]])
        start = jnp.concatenate([b[0], jnp.array([0.0, 1.0])])
        return (jsl.expm(0.6 * augmented) @ start)[:N]

    def krylov(matrix, b1):
        return kx.phimv(matrix, (b[0], b1, b[2]), 0.6, rtol=1e-12)

    primals, tangents = (A, b[1]), (A.T, V)
    got = jax.jvp(krylov, primals, tangents)[1]
    assert rel_err(got, jax.jvp(dense, primals, tangents)[1]) < 1e-9
    with pytest.raises((NotImplementedError, RuntimeError), match="DirectAdjoint"):
        jax.jacfwd(jax.jacfwd(lambda s: kx.expmv(s * A, V, 0.5)))(1.0)


@pytest.mark.slow
def test_vmap_of_grad_and_float32():
    scales = jnp.array([0.5, 1.0])
    got = jax.vmap(
        jax.grad(lambda s: jnp.sum(kx.expmv(s * A, V, 1.0, rtol=1e-12) ** 2))
    )(scales)
    want = jax.vmap(jax.grad(lambda s: jnp.sum((jsl.expm(s * A) @ V) ** 2)))(scales)
    assert rel_err(got, want) < 1e-9
    a32, v32 = A.astype(jnp.float32), V.astype(jnp.float32)
    g32 = jax.grad(lambda m: jnp.sum(kx.expmv(m, v32, 1.0) ** 2))(a32)
    want32 = jax.grad(lambda m: jnp.sum((jsl.expm(m) @ V) ** 2))(A)
    assert g32.dtype == jnp.float32
    assert rel_err(g32, want32) < 1e-4


def test_grad_of_vmap_with_a_shared_operator():
    """A batch of start vectors under one operator (`vmap(f, in_axes=(None, 0))`, as
    in training on many initial conditions): the operator's gradient sums the batch,
    and forward mode under `vmap` shares the operator's tangent."""
    vectors = jnp.stack([V, V[::-1], jnp.cos(V)])

    def loss(solve, matrix):
        return jnp.sum(jax.vmap(solve, in_axes=(None, 0))(matrix, vectors) ** 2)

    def krylov(m, v):
        return kx.expmv(m, v, 0.7, rtol=1e-12)

    def dense(m, v):
        return jsl.expm(0.7 * m) @ v

    got = jax.jit(jax.grad(lambda m: loss(krylov, m)))(A)
    assert rel_err(got, jax.grad(lambda m: loss(dense, m))(A)) < 1e-9
    tangents = jax.vmap(lambda v: jax.jvp(lambda m: krylov(m, v), (A,), (A.T,))[1])
    want = jax.vmap(lambda v: jax.jvp(lambda m: dense(m, v), (A,), (A.T,))[1])
    assert rel_err(tangents(vectors), want(vectors)) < 1e-9


def test_vmap_with_direct_adjoint():
    """`DirectAdjoint` batches its loops with plain `vmap` (no sequential map, so
    every member runs until the slowest is done): values over a batch of vectors and
    operator scales whose members need different numbers of Krylov steps."""
    vs = jnp.stack([V, V[::-1], jnp.cos(V)])
    scales = jnp.array([0.1, 1.0, 4.0])

    @jax.jit
    @jax.vmap
    def batched(s, v):
        return kx.expmv(s * A, v, 0.9, adjoint=kx.DirectAdjoint(), rtol=1e-12)

    values = batched(scales, vs)
    for i in range(3):
        want = jsl.expm(0.9 * scales[i] * A) @ vs[i]
        assert rel_err(values[i], want) < 1e-10


def test_module_config_is_jittable():
    solver = kx.KrylovExpm(rtol=1e-10)
    f = eqx.filter_jit(lambda s, m, v: s(m, v, 0.3))
    np.testing.assert_allclose(f(solver, A, V), jsl.expm(0.3 * A) @ V, rtol=1e-9)


# One substep whose basis the forward pass keeps (default budget).
_KEPT = dict(norm=500.0, options={})
# Many substeps of dimension 26 to 30 rebuilt outside a 26-row budget, and a last one
# within it that is kept (one chunk of 31 rows: cheap to compile). Dimensions today:
# 30 30 27 26 23 26 20 (Lanczos), 30 30 30 27 25 30 23 30 27 27 26 24 (Arnoldi).
_REBUILT = dict(norm=3000.0, options=dict(max_krylov_dim=30), basis_rows=26)


@pytest.mark.parametrize(
    "method, setting",
    [
        pytest.param("lanczos", _REBUILT, marks=pytest.mark.slow),
        pytest.param("lanczos", _KEPT, marks=pytest.mark.slow),
        pytest.param("arnoldi", _KEPT, marks=pytest.mark.slow),
        pytest.param("arnoldi", _REBUILT, marks=pytest.mark.slow),
    ],
    ids=["rebuilt-lanczos", "kept-lanczos", "kept-arnoldi", "rebuilt-arnoldi"],
)
def test_grad_of_a_large_state_against_the_fourier_exact_solution(method, setting):
    """A state large enough that the basis grows in chunks and the backward pass
    keeps or rebuilds it within `basis_rows` (`n = 8192`: above 1 MiB per basis): value
    and gradient in (κ, c) and `v` against the exact solution of the periodic problem
    by the discrete Fourier transform."""
    n = 8192
    matvec, exact = periodic_convection_diffusion(n)
    x = jnp.arange(n) / n
    v = jnp.exp(-((x - 0.4) ** 2) / 0.002) + 0.3 * jnp.sin(6 * jnp.pi * x)
    theta = jnp.array([1.0, 0.0 if method == "lanczos" else 300.0])
    t = setting["norm"] / (4 * n**2)
    adjoint = kx.KrylovAdjoint(basis_rows=setting.get("basis_rows", 32))
    solver = kx.KrylovExpm(
        method=method, rtol=1e-10, adjoint=adjoint, **setting["options"]
    )
    tags = lx.symmetric_tag if method == "lanczos" else ()

    def solve(theta, v):
        structure = jax.ShapeDtypeStruct((n,), v.dtype)
        op = lx.FunctionLinearOperator(lambda u: matvec(theta, u), structure, tags)
        return solver.expmv(op, v, t)

    def loss(theta, v):
        return jnp.sum(jnp.sin(solve(theta, v).value))

    def loss_exact(theta, v):
        return jnp.sum(jnp.sin(exact(theta, v, t)))

    sol = jax.jit(solve)(theta, v)
    dims = np.asarray(sol.stats["krylov_dims"])[: int(sol.stats["num_substeps"])]
    if setting.get("basis_rows"):
        assert dims.max() + 1 > setting["basis_rows"] >= dims[-1] + 1
    assert rel_err(sol.value, exact(theta, v, t)) < 1e-9
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(theta, v)
    want = jax.grad(loss_exact, argnums=(0, 1))(theta, v)
    assert abs(got[0][0] - want[0][0]) < 1e-9 * abs(want[0][0])
    assert abs(got[0][1] - want[0][1]) < 1e-9 * jnp.linalg.norm(want[0])
    assert rel_err(got[1], want[1]) < 1e-9


def test_basis_rows_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="basis_rows"):
        kx.KrylovAdjoint(basis_rows=-1)


class _TwoTermMatvec:
    """`A(a, b) = a M1 + b² M2`: nonlinear in its parameters, linear in its vector."""

    def __init__(self, m1, m2):
        self.m1, self.m2 = m1, m2

    def matvec(self, params, x):
        a, b = params
        return a * (self.m1 @ x) + b**2 * (self.m2 @ x)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.complex128])
@pytest.mark.parametrize("forward_count, adjoint_count", [(7, 5), (3, 8), (6, 6)])
def test_parameter_cotangent_over_either_basis(forward_count, adjoint_count, dtype):
    """The parameter cotangent of a transposed substep takes its matvec VJPs over the
    shorter of the forward basis and the adjoint's (here in two chunks, the second
    with the Lanczos prefix): either way it is the derivative of the bilinear form
    `Σ G[a, b] z_aᵀ A(θ) q_b`, by autodiff of the dense expression."""
    from krylovexp import _arnoldi as arnoldi
    from krylovexp._backward import _matvec_vjp_sum

    n, rows = 10, 8
    keys = jax.random.split(jax.random.PRNGKey(3), 5)

    def draw(key, shape):
        x = jax.random.normal(key, shape + (2,))
        return (
            x[..., 0] + 1j * x[..., 1] if dtype == jnp.complex128 else x[..., 0]
        ).astype(dtype)

    system = _TwoTermMatvec(draw(keys[0], (n, n)), draw(keys[1], (n, n)))
    forward, adjoint_rows = draw(keys[2], (rows, n)), draw(keys[3], (rows, n))
    inside = (jnp.arange(rows)[:, None] < adjoint_count) & (
        jnp.arange(rows)[None, :] < forward_count
    )
    gram = jnp.where(inside, draw(keys[4], (rows, rows)), 0)
    orth = arnoldi.Orthogonalisation(window=2, hermitian=True)
    chunks = (adjoint_rows[:4], adjoint_rows[2:])  # rows 2, 3 repeated as the prefix
    adjoint = arnoldi.Decomposition(chunks, jnp.zeros((rows, rows - 1), dtype), 1.0)
    assert arnoldi.capacity(adjoint, orth) == rows
    params = (jnp.asarray(0.7), jnp.asarray(-1.3))

    got = jax.jit(_matvec_vjp_sum, static_argnums=(0, 5))(
        system, params, forward, gram, adjoint, orth, forward_count, adjoint_count
    )

    def form(params):
        applied = jax.vmap(lambda q: system.matvec(params, q))(forward)
        return jnp.real(jnp.sum(gram * (adjoint_rows @ applied.T)))

    want = jax.grad(form)(params)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12)
