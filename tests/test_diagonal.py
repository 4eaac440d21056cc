"""The exact diagonal path: phi-functions against mpmath, expmv/phimv against dense
SciPy references, gradients, and the integrators on a Fourier-space problem."""

import functools
import math
import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import mpmath
import numpy as np
import pytest
import scipy.linalg

import krylovexp as kx
from krylovexp._diagonal import phi_functions
from support.measure import rel_err
from support.references import phi_ref


P = 4  # phi_0 ... phi_4: every order the integrators use


@functools.cache
def _phi_mp(z: complex, j: int):
    """phi_j(z) to ~40 digits: Taylor series near 0, closed form elsewhere, with the
    working precision raised to absorb the cancellation of the closed form."""
    with mpmath.workdps(60 + 5 * j):
        z = mpmath.mpc(z)
        if abs(z) < 1:
            return sum(z**k / mpmath.factorial(k + j) for k in range(60))
        head = sum(z**k / mpmath.factorial(k) for k in range(j))
        return (mpmath.exp(z) - head) / z**j


def _grid(dtype):
    """|z| from 1e-8 to 1e4 on the positive and negative real axes, the imaginary
    axis and two complex directions; rounded to `dtype` (the reference is taken at the
    rounded point)."""
    magnitudes = np.logspace(-8, 4, 13)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        angles = np.array([0.0, np.pi, np.pi / 2, 0.75 * np.pi, 0.3 * np.pi])
        z = (magnitudes[:, None] * np.exp(1j * angles)).ravel()
        z = np.append(z, 0)
    else:
        z = np.concatenate([magnitudes, -magnitudes, [0.0]])
    return np.asarray(jnp.asarray(z, dtype))


def _reference(z, derivative=False):
    out = np.empty((P + 1, z.size), complex)
    for i, zi in enumerate(z):
        for j in range(P + 1):
            with mpmath.workdps(60):
                value = _phi_mp(complex(zi), j)
                if derivative:  # phi_j' = phi_j - j phi_{j+1}
                    value = value - j * _phi_mp(complex(zi), j + 1)
                out[j, i] = complex(value)
    return out


def _check(values, reference, dtype, ulps):
    info = jnp.finfo(dtype)
    values = np.asarray(values).astype(complex)
    # Values below the normal range are flushed to zero by XLA's CPU backend, and
    # values beyond the range overflow: both are outside what any evaluation returns.
    scale = np.abs(reference)
    usable = (scale > 1e6 * float(info.tiny)) & (scale < float(info.max))
    error = np.abs(values[usable] - reference[usable]) / scale[usable]
    assert error.max() < ulps * float(info.eps), error.max() / float(info.eps)


@jax.jit
def _phi_and_derivative(z):
    return jax.jvp(lambda z: phi_functions(z, P), (z,), (jnp.ones_like(z),))


@pytest.mark.parametrize(
    "dtype", [jnp.float64, jnp.float32, jnp.complex128, jnp.complex64]
)
def test_phi_values_and_derivatives_against_mpmath(dtype):
    z = _grid(dtype)
    values, derivatives = _phi_and_derivative(jnp.asarray(z))
    assert values.dtype == dtype
    _check(values, _reference(z), dtype, ulps=16)
    _check(derivatives, _reference(z, derivative=True), dtype, ulps=64)


def test_phi_recurrence_and_overflow():
    # Same shape and dtype as the float64 grid: reuses its compilation.
    size = _grid(jnp.float64).size
    z = np.concatenate(
        [-np.logspace(-6, 3, size // 2), np.logspace(-6, 2.5, size // 2)]
    )
    z = np.append(z, 720.0)[:size]
    z[-1] = 720.0
    phis, _ = _phi_and_derivative(jnp.asarray(z))
    for j in range(P):
        lhs, rhs = phis[j, :-1], z[:-1] * phis[j + 1, :-1] + 1.0 / math.factorial(j)
        scale = np.abs(lhs) + np.abs(z[:-1] * phis[j + 1, :-1]) + 1
        assert np.max(np.abs(lhs - rhs) / scale) < 8e-16
    # exp(720) overflows; phi_j(720) = (e^720 - ...) / 720^j does not for j >= 1.
    assert np.isinf(phis[0, -1])
    for j in (1, 2, 3):
        expected = float(_phi_mp(720.0, j).real)
        np.testing.assert_allclose(phis[j, -1], expected, rtol=1e-13)


def test_phi_gradients_finite_at_zero():
    # No NaN from the branch that is not taken, also for second derivatives.
    def f(x):
        return jnp.sum(phi_functions(x, 3))

    x = jnp.asarray([0.0, 1e-300, -2.0, 2.0, -1e4])
    first = jax.jit(jax.vmap(jax.grad(f)))(x)
    second = jax.jit(jax.vmap(jax.grad(jax.grad(f))))(x)
    assert np.all(np.isfinite(first)) and np.all(np.isfinite(second))
    # sum_j phi_j'(0) = sum_j 1/(j+1)!, sum_j phi_j''(0) = sum_j 2/(j+2)!
    np.testing.assert_allclose(first[0], 1 + 1 / 2 + 1 / 6 + 1 / 24, rtol=1e-15)
    np.testing.assert_allclose(second[0], 2 * (1 / 2 + 1 / 6 + 1 / 24 + 1 / 120))


# ---------------------------------------------------------------------------------
# expmv / phimv on diagonal operators.

N = 12
RNG = np.random.default_rng(0)
DIAG_REAL = -np.logspace(-3, 3, N) * RNG.choice([-0.01, 1.0], N)
DIAG_COMPLEX = DIAG_REAL + 1j * 40 * RNG.standard_normal(N)
VECS = RNG.standard_normal((3, N)) + 1j * RNG.standard_normal((3, N))


@eqx.filter_jit
def _phimv_and_expmv(operator, vectors, times, t):
    solver = kx.KrylovExpm()
    return solver.phimv(operator, vectors, times), solver.expmv(operator, vectors[0], t)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex128])
def test_phimv_against_augmented_expm(dtype):
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    diag = (DIAG_COMPLEX if complex_ else DIAG_REAL).astype(dtype)
    vectors = tuple(
        jnp.asarray((v if complex_ else v.real).astype(dtype)) for v in VECS
    )
    times = jnp.asarray([0.0, 0.01, 0.3, 0.7])
    operator = lx.DiagonalLinearOperator(jnp.asarray(diag))
    sol, expm = _phimv_and_expmv(operator, vectors, times, -0.02)
    assert sol.result == kx.RESULTS.successful
    assert int(sol.stats["num_matvecs"]) == 0
    assert sol.value.shape == (4, N) and sol.value.dtype == dtype
    tol = 1e-13 if jnp.finfo(dtype).bits == 64 else 3e-6
    dense = np.diag(diag.astype(complex))
    for k, t in enumerate(np.asarray(times)):
        assert rel_err(sol.value[k], phi_ref(dense, vectors, float(t))) < tol
    reference = scipy.linalg.expm(-0.02 * dense) @ vectors[0]
    assert rel_err(expm.value, reference) < tol


@eqx.filter_jit
def _structures_and_codes(diag, vector, vectors):
    solver, quiet = kx.KrylovExpm(), kx.KrylovExpm(throw=False)
    tree = {"a": diag[:5], "b": diag[5:].reshape(7, 1)}
    tree_v = {"a": vector[:5], "b": vector[5:].reshape(7, 1)}
    tagged = lx.MatrixLinearOperator(jnp.diag(diag), lx.diagonal_tag)
    operator = lx.DiagonalLinearOperator(diag)
    return (
        solver.expmv(lx.DiagonalLinearOperator(tree), tree_v, 0.4).value,
        solver.phimv(tagged, vectors, 0.5),
        kx.ExpmLinearOperator(operator, 0.5).mv(vector),
        quiet.expmv(operator, vector, jnp.asarray([0.2, 0.1])).result,
        quiet.expmv(
            lx.DiagonalLinearOperator(diag.at[0].set(jnp.nan)), vector, 1.0
        ).result,
        quiet.expmv(lx.DiagonalLinearOperator(diag + 1000.0), vector, 1.0).result,
    )


def test_pytree_tagged_operators_and_result_codes():
    diag, vector = jnp.asarray(DIAG_REAL), jnp.asarray(VECS[0].real)
    vectors = (vector, jnp.asarray(VECS[1].real))
    tree, tagged, expm_op, nonmonotone, nan_input, overflow = _structures_and_codes(
        diag, vector, vectors
    )
    expected = np.exp(0.4 * DIAG_REAL) * VECS[0].real
    np.testing.assert_allclose(tree["a"], expected[:5], rtol=1e-14)
    np.testing.assert_allclose(tree["b"][:, 0], expected[5:], rtol=1e-14)
    # An operator Lineax reports diagonal (a tagged matrix) takes the same path...
    assert int(tagged.stats["num_matvecs"]) == 0
    assert rel_err(tagged.value, phi_ref(np.diag(DIAG_REAL), vectors, 0.5)) < 1e-14
    # ... and so does the exponential of a diagonal operator as a Lineax operator.
    expected = np.exp(0.5 * DIAG_REAL) * VECS[0].real
    np.testing.assert_allclose(expm_op, expected, rtol=1e-14)
    assert nonmonotone == kx.RESULTS.nonmonotone_times
    assert nan_input == kx.RESULTS.nonfinite_input
    assert overflow == kx.RESULTS.nonfinite_output
    with pytest.raises(Exception, match="not finite"):
        kx.expmv(lx.DiagonalLinearOperator(jnp.full(3, 1000.0)), jnp.ones(3))
    with pytest.raises(ValueError, match="must be real"):
        kx.expmv(lx.DiagonalLinearOperator(diag), vector, 1j)


# ---------------------------------------------------------------------------------
# Gradients and transformations.


def _dense_phi(diag, vectors, t):
    """The augmented-matrix identity in JAX (differentiable dense reference)."""
    n, p = diag.shape[0], len(vectors) - 1
    top = jnp.concatenate([jnp.diag(diag), jnp.stack(vectors[:0:-1], axis=1)], axis=1)
    bottom = jnp.concatenate(
        [jnp.zeros((p, n), diag.dtype), jnp.eye(p, k=1, dtype=diag.dtype)], axis=1
    )
    start = jnp.concatenate([vectors[0], jnp.eye(p, dtype=diag.dtype)[-1]])
    return (jax.scipy.linalg.expm(t * jnp.concatenate([top, bottom])) @ start)[:n]


def _ours(diag, vectors, t):
    return kx.phimv(lx.DiagonalLinearOperator(diag), vectors, t)


@eqx.filter_jit
def _derivatives(phi, diag, vectors, t, tangent):
    def loss(diag, vectors, t):
        return jnp.sum(jnp.abs(phi(diag, vectors, t)) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(diag, vectors, t)
    _, jvp = jax.jvp(lambda d: phi(d, vectors, t), (diag,), (tangent,))
    # Central differences (step 1e-6) in t and in the real part of one entry.
    eps, e3 = 1e-6, jnp.zeros_like(diag).at[3].set(1)
    fd_t = (loss(diag, vectors, t + eps) - loss(diag, vectors, t - eps)) / (2 * eps)
    fd_d = loss(diag + eps * e3, vectors, t) - loss(diag - eps * e3, vectors, t)
    return grads, jvp, fd_t, fd_d / (2 * eps)


def test_gradients_against_dense_autodiff_and_finite_differences():
    # Complex diagonal, moderate spectrum (|tD| <= 5: the dense expm is accurate).
    diag = jnp.asarray(DIAG_COMPLEX / 200)
    vectors = tuple(jnp.asarray(v) for v in VECS)
    t = jnp.asarray(0.8)
    tangent = jnp.asarray(RNG.standard_normal(N), diag.dtype)
    ours, jvp_ours, fd_t, fd_d = _derivatives(_ours, diag, vectors, t, tangent)
    dense, jvp_dense, _, _ = _derivatives(_dense_phi, diag, vectors, t, tangent)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(dense), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11 * np.max(np.abs(b)))
    np.testing.assert_allclose(jvp_ours, jvp_dense, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ours[2], fd_t, rtol=1e-8)
    np.testing.assert_allclose(jnp.real(ours[0][3]), fd_d, rtol=1e-7)


def test_stiff_gradient_and_vmap():
    # |tD| up to 1e4; reference: the closed form d/dd exp(t d) v = t exp(t d) v.
    diag = jnp.asarray(-np.logspace(-2, 4, N))
    v = jnp.asarray(VECS[0].real)
    grad = jax.jit(
        jax.grad(lambda d: jnp.sum(kx.expmv(lx.DiagonalLinearOperator(d), v, 1.0)))
    )(diag)
    np.testing.assert_allclose(grad, np.exp(diag) * v, rtol=1e-14, atol=1e-300)

    @jax.jit
    @jax.vmap
    def batched(d, b0, b1):
        return kx.phimv(lx.DiagonalLinearOperator(d), (b0, b1), 0.3)

    scales = jnp.asarray([0.5, 1.0, 2.0])
    out = batched(
        scales[:, None] * diag, jnp.stack([v] * 3), jnp.stack([v, 2 * v, 3 * v])
    )
    for k in range(3):
        expected = phi_ref(np.diag(scales[k] * diag), (v, (k + 1) * v), 0.3)
        assert rel_err(out[k], expected) < 1e-14


# ---------------------------------------------------------------------------------
# Integrators on a Fourier-space (complex state) problem.

# 1-D Kuramoto–Sivashinsky u_t = -u_xx - u_xxxx - u u_x on [0, 22), 32 points,
# in rFFT coefficients: L(k) = k² - k⁴, N(û) = -(i k / 2) rfft(irfft(û)²), 2/3 rule.
_POINTS, _EXTENT = 32, 22.0
_K = 2 * np.pi / _EXTENT * np.arange(_POINTS // 2 + 1)
_SYMBOL = jnp.asarray(_K**2 - _K**4, dtype=jnp.complex128)
_MASK = jnp.asarray(np.arange(_POINTS // 2 + 1) < _POINTS // 3)
_X = np.arange(_POINTS) * _EXTENT / _POINTS
_U0 = np.cos(2 * np.pi * _X / _EXTENT) + 0.5 * np.sin(4 * np.pi * _X / _EXTENT)
_T = 2.0


def _nonlinear(t, u_hat, args):
    u = jnp.fft.irfft(jnp.where(_MASK, u_hat, 0), n=_POINTS)
    return jnp.where(_MASK, -0.5j * jnp.asarray(_K) * jnp.fft.rfft(u * u), 0)


def _physical_rhs(t, u, args):
    # The same semi-discretisation in real arithmetic, for the independent reference.
    u_hat = jnp.fft.rfft(u)
    return jnp.fft.irfft(_SYMBOL * u_hat + _nonlinear(t, u_hat, args), n=_POINTS)


@pytest.fixture(scope="module")
def ks_reference():
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_physical_rhs),
        diffrax.Dopri8(),
        0.0,
        _T,
        1e-3,
        jnp.asarray(_U0),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=100_000,
    )
    return np.fft.rfft(np.asarray(sol.ys[-1]))


_MAX_STEPS = 32


@eqx.filter_jit
def _ks_solve(solver, num_steps, symbol_scale):
    terms = diffrax.MultiTerm(
        kx.LinearTerm(lambda s: lx.DiagonalLinearOperator(s * _SYMBOL)),
        diffrax.ODETerm(_nonlinear),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Complex dtype")
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            _T,
            _T / num_steps,
            jnp.fft.rfft(jnp.asarray(_U0)).astype(jnp.complex128),
            args=symbol_scale,
            max_steps=_MAX_STEPS + 1,
        )
    return sol.ys[-1]


@pytest.mark.parametrize(
    "solver, order",
    [(kx.ExponentialEuler(), 1), (kx.ETDRK2(), 2), (kx.ETDRK4(), 4)],
)
def test_integrators_fourier_order(solver, order, ks_reference):
    steps = (8, 16) if order == 4 else (16, 32)
    errors = [
        rel_err(_ks_solve(solver, jnp.asarray(s), 1.0), ks_reference) for s in steps
    ]
    slope = np.log2(errors[0] / errors[1])
    assert abs(slope - order) < 0.35, (errors, slope)
    if order == 4:
        assert errors[1] < 1e-5


def test_integrator_gradient_wrt_symbol():
    # One ETDRK4 step through the solver's own init/step: the symbol reaches the
    # step through the cached coefficient table (built in `init`).
    solver = kx.ETDRK4()
    y0 = jnp.fft.rfft(jnp.asarray(_U0)).astype(jnp.complex128)
    nonlinear = diffrax.ODETerm(_nonlinear)

    @jax.jit
    def loss(scale):
        linear = kx.LinearTerm(lx.DiagonalLinearOperator(scale * _SYMBOL))
        terms = diffrax.MultiTerm(linear, nonlinear)
        state = solver.init(terms, 0.0, 0.5, y0, None)
        y1 = solver.step(terms, 0.0, 0.5, y0, None, state, False)[0]
        return jnp.sum(jnp.abs(y1) ** 2)

    grad = jax.jit(jax.grad(loss))(1.0)
    eps = 1e-6
    fd = (loss(1.0 + eps) - loss(1.0 - eps)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_linear_exponential_diagonal_and_uneven_steps():
    # y' = L y exactly; uneven steps rebuild the cached coefficients every step.
    y0 = jnp.fft.rfft(jnp.asarray(_U0)).astype(jnp.complex128)
    grid = jnp.asarray([0.0, 0.1, 0.35, 0.4, 1.0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Complex dtype")
        sol = diffrax.diffeqsolve(
            kx.LinearTerm(lx.DiagonalLinearOperator(_SYMBOL)),
            kx.LinearExponential(),
            0.0,
            1.0,
            None,
            y0,
            stepsize_controller=diffrax.StepTo(ts=grid),
            saveat=diffrax.SaveAt(ts=jnp.asarray([0.2, 0.4, 1.0])),
        )
    for k, t in enumerate((0.2, 0.4, 1.0)):
        exact = np.exp(t * np.asarray(_SYMBOL)) * np.asarray(y0)
        tol = 1e-14 if t != 0.2 else 1e-4  # 0.2 lies inside a step: dense output
        assert rel_err(sol.ys[k], exact) < tol
