"""Property-based tests over generated operators (hypothesis).

The contract under test: a value within the tolerance, or a result code that says
otherwise. Precisely, for a successful `expmv` with output times `t_i`,

    |value_i - exp(t_i A) v| <= 10 G (atol + rtol S) + 10 u |tA| S,

with `S = max(|v|, max_i |exp(t_i A) v|)`, `G = stats["growth_factor"]` (the reported
estimate of how much the operator amplifies errors of earlier substeps; 1 unless it is
strongly non-normal) and `u |tA| S` the rounding error of any normwise backward-stable
method in the working precision `u`. References are dense: SciPy's `expm`, and a
50-digit mpmath exponential where SciPy's disagrees.

Operators: normal, Hermitian (also dissipative: then G must be 1), skew-Hermitian,
random non-normal, strongly non-normal triangular (Pascal-type), Jordan blocks,
nilpotent, chains of weak then strong couplings, and operators whose exponential
grows far more than it grows `v`; real and complex, `|tA|` from 1e-8 to 1e4; times
zero, negative, scalar or grids. To reuse compiled functions, every operator is
padded to `N x N` (zero rows and columns outside its `m x m` block, zero vector
entries there) and times are always a grid of 3 (a scalar `t` as `[t, t, t]`).

Profiles (`tests/conftest.py`): "ci" (default) runs a few examples per property and
three configurations; `HYPOTHESIS_PROFILE=thorough` runs hundreds per property and
all configurations in `CONFIGS`.
"""

import math
import os
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import lineax as lx
import mpmath
import numpy as np
import scipy.linalg
from hypothesis import assume, given, settings, strategies as st

import krylovexp as kx


N = 6
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "thorough"


class Config(NamedTuple):
    name: str
    dtype: type
    rtol: float
    integer: bool = False
    lanczos: bool = False


CONFIGS = [
    Config("float64", jnp.float64, 1e-8),
    Config("complex128", jnp.complex128, 1e-6),
    Config("float32", jnp.float32, 1e-5),
]
if THOROUGH:
    CONFIGS += [
        Config("float64 rtol 1e-4", jnp.float64, 1e-4),
        Config("integer matrix", jnp.float64, 1e-8, integer=True),
        Config("float64 Lanczos", jnp.float64, 1e-8, lanczos=True),
        Config("complex64", jnp.complex64, 1e-5),
    ]

KINDS = (
    "normal",
    "hermitian",
    "dissipative",
    "skew",
    "nonnormal",
    "triangular",
    "jordan",
    "nilpotent",
    "weak_coupling",
    "growth",
)


class Case(NamedTuple):
    matrix: np.ndarray  # N x N, complex128 or float64
    vector: np.ndarray
    times: np.ndarray  # 3 monotone times
    kind: str
    norm: float  # |t A|_2 at the largest |t|


def _operator_block(kind, m, rng, complex_):
    def gauss(*shape):
        x = rng.standard_normal(shape)
        return x + 1j * rng.standard_normal(shape) if complex_ else x

    if kind in ("hermitian", "dissipative", "skew"):
        b = gauss(m, m)
        if kind == "dissipative":
            return -(b @ b.conj().T)
        return (b + b.conj().T) / 2 if kind == "hermitian" else (b - b.conj().T) / 2
    if kind == "normal":
        q, _ = np.linalg.qr(gauss(m, m))
        if complex_:
            return q @ np.diag(gauss(m)) @ q.conj().T
        blocks = np.zeros((m, m))
        for i in range(0, m - 1, 2):
            a, b = rng.standard_normal(2)
            blocks[i : i + 2, i : i + 2] = [[a, b], [-b, a]]
        if m % 2:
            blocks[-1, -1] = rng.standard_normal()
        return q @ blocks @ q.T
    if kind == "nonnormal":
        return gauss(m, m)
    if kind == "triangular":
        upper = np.triu(gauss(m, m), 1) * 10.0 ** rng.uniform(0, 3)
        return upper - np.diag(np.abs(rng.standard_normal(m)))
    if kind == "jordan":
        return gauss(1)[0] * np.eye(m) + 10.0 ** rng.uniform(0, 2) * np.eye(m, k=1)
    if kind == "nilpotent":
        return np.tril(gauss(m, m), -1)
    if kind == "weak_coupling":
        couplings = 10.0 ** rng.uniform(-10, 4, size=max(m - 1, 0))
        return np.diag(0.1 * gauss(m)) + np.diag(couplings, -1)
    assert kind == "growth"
    # One growing mode, the rest decaying; v is almost orthogonal to the growing one.
    rates = -np.abs(rng.standard_normal(m))
    rates[-1] = 1.0
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return q @ np.diag(rates) @ q.T


def _start_vector(kind, block, rng, complex_):
    m = block.shape[0]
    if kind == "weak_coupling":
        return np.eye(m)[0].astype(block.dtype)
    v = rng.standard_normal(m) + (1j * rng.standard_normal(m) if complex_ else 0)
    if kind == "growth":
        w, q = np.linalg.eigh(block)
        top = q[:, np.argmax(w)]
        v = v - top * (top @ v) + 1e-6 * top
    return v / np.linalg.norm(v)


@st.composite
def cases(draw, config: Config, kinds=KINDS, max_log_norm=4.0):
    complex_ = jnp.issubdtype(config.dtype, jnp.complexfloating)
    kind = "hermitian" if config.lanczos else draw(st.sampled_from(kinds))
    if config.lanczos and complex_:
        raise AssertionError("the Lanczos configuration is real")
    m = draw(st.integers(1, N))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if config.integer:
        block = rng.integers(-3, 4, size=(m, m)).astype(float)
    else:
        block = _operator_block(kind, m, rng, complex_)
    vector = _start_vector(kind, block, rng, complex_)
    # Times: zero, a scalar (as [t, t, t]) or a grid, of either sign.
    span = draw(st.sampled_from([1.0, 0.37, 2.5]))
    shape = draw(st.sampled_from(["zero", "scalar", "grid"]))
    sign = draw(st.sampled_from([1.0, -1.0]))
    if shape == "zero":
        times = np.zeros(3)
    elif shape == "scalar":
        times = np.full(3, sign * span)
    else:
        first = draw(st.floats(0, 1))
        second = draw(st.floats(first, 1))
        times = sign * span * np.array([first, second, 1.0])
    log_norm = draw(st.floats(-8, max_log_norm))
    norm = np.linalg.norm(block, 2)
    if norm > 0 and not config.integer:
        block = block * (10.0**log_norm / (norm * span))
    matrix = np.zeros((N, N), block.dtype)
    matrix[:m, :m] = block
    padded = np.zeros(N, vector.dtype)
    padded[:m] = vector
    scale = np.linalg.norm(matrix, 2) * np.max(np.abs(times))
    return Case(matrix, padded, times, kind, float(scale))


@eqx.filter_jit
def _expmv(solver, operator, vector, times):
    return solver.expmv(operator, vector, times)


def krylov(config: Config, case: Case, vector=None, times=None):
    """The solution for a case in the configuration's dtype (one compilation each)."""
    solver = kx.KrylovExpm(rtol=config.rtol, throw=False)
    matrix = case.matrix.astype(np.int64) if config.integer else case.matrix
    operator = jnp.asarray(matrix if config.integer else matrix.astype(config.dtype))
    if config.lanczos:
        operator = lx.MatrixLinearOperator(operator, lx.symmetric_tag)
    vector = case.vector if vector is None else vector
    times = case.times if times is None else times
    vector = jnp.asarray(np.asarray(vector).astype(config.dtype))
    if config.integer:
        vector = vector.astype(jnp.float64)
    return _expmv(solver, operator, vector, jnp.asarray(times, jnp.float64))


def dense(matrix, vector, times, exact=False):
    """exp(t A) v for each t, by SciPy, or with 50 significant digits by mpmath."""
    if not exact:
        with np.errstate(all="ignore"):
            return np.stack([scipy.linalg.expm(t * matrix) @ vector for t in times])
    out = []
    with mpmath.workdps(50):
        for t in times:
            exp = mpmath.expm(mpmath.matrix((t * matrix).tolist()))
            value = exp * mpmath.matrix(vector.tolist())
            out.append([complex(x) for x in value])
    out = np.array(out)
    return out if np.iscomplexobj(matrix) else out.real


def unit_roundoff(dtype):
    return float(jnp.finfo(dtype).eps) / 2


def honest_bound(config, case, sol, reference):
    """The right-hand side of the contract in the module docstring."""
    growth = float(sol.stats["growth_factor"])
    scale = max(np.linalg.norm(case.vector), np.max(np.linalg.norm(reference, axis=1)))
    rounding = 10 * unit_roundoff(config.dtype) * max(case.norm, 1.0) * scale
    return 10 * growth * config.rtol * scale + rounding


def errors(sol, reference):
    return np.linalg.norm(np.asarray(sol.value, reference.dtype) - reference, axis=1)


def check_honest(config, case, sol):
    """The value meets the tolerance (with the reported growth factor), or the result
    code is not successful. Returns the errors for further checks."""
    if sol.result != kx.RESULTS.successful:
        if sol.result == kx.RESULTS.max_substeps_reached:
            assert np.any(np.isnan(np.asarray(sol.value)))
        return None
    growth = float(sol.stats["growth_factor"])
    assert growth >= 1 and np.isfinite(growth)
    assert growth * config.rtol < 1
    matrix = case.matrix.astype(np.result_type(config.dtype, np.float64))
    vector = case.vector.astype(matrix.dtype)
    if config.integer or jnp.finfo(config.dtype).bits < 64:
        # The reference of what the solver was given: the rounded inputs.
        matrix = np.asarray(case.matrix.astype(config.dtype), matrix.dtype)
        vector = np.asarray(case.vector.astype(config.dtype), matrix.dtype)
    reference = dense(matrix, vector, case.times)
    bad = not np.all(np.isfinite(reference)) or np.max(
        errors(sol, reference)
    ) > honest_bound(config, case, sol, reference)
    if bad:  # SciPy's expm can itself be inaccurate for these operators
        reference = dense(matrix, vector, case.times, exact=True)
    error = errors(sol, reference)
    bound = honest_bound(config, case, sol, reference)
    assert np.max(error) <= bound, (case.kind, error, bound, growth)
    if case.kind == "dissipative" and np.all(case.times >= 0):
        assert growth == 1.0
    return error


# ---------------------------------------------------------------------------------
# The contract, per configuration.


def _honesty(config):
    @given(case=cases(config))
    def test(case):
        check_honest(config, case, krylov(config, case))

    return test


test_honest_float64 = _honesty(CONFIGS[0])
test_honest_complex128 = _honesty(CONFIGS[1])
test_honest_float32 = _honesty(CONFIGS[2])
if THOROUGH:
    test_honest_float64_loose = _honesty(CONFIGS[3])
    test_honest_integer_matrix = _honesty(CONFIGS[4])
    test_honest_lanczos = _honesty(CONFIGS[5])
    test_honest_complex64 = _honesty(CONFIGS[6])


# ---------------------------------------------------------------------------------
# Identities (float64, sharing the compiled solver of `test_honest_float64`).

F64 = CONFIGS[0]


@given(case=cases(F64), split=st.floats(0.05, 0.95))
def test_semigroup(case, split):
    """exp(tA) exp(sA) v = exp((s + t)A) v, each side within its tolerances."""
    total = case.times[-1]
    assume(total != 0)
    s, t = split * total, (1 - split) * total
    first = krylov(F64, case, times=np.full(3, s))
    second = krylov(F64, case, vector=np.asarray(first.value[-1]), times=np.full(3, t))
    direct = krylov(F64, case, times=np.array([s, s, s + t]))
    solutions = (first, second, direct)
    assume(all(sol.result == kx.RESULTS.successful for sol in solutions))
    lhs, rhs = np.asarray(second.value[-1]), np.asarray(direct.value[-1])
    scales = [
        max(np.linalg.norm(sol.value[-1]), np.linalg.norm(start))
        for sol, start in zip(
            solutions, (case.vector, first.value[-1], case.vector), strict=True
        )
    ]
    growths = [float(sol.stats["growth_factor"]) for sol in solutions]
    propagator = np.linalg.norm(scipy.linalg.expm(t * case.matrix), 2)
    assume(np.isfinite(propagator))
    tolerances = [10 * g * F64.rtol * x for g, x in zip(growths, scales, strict=True)]
    rounding = 10 * unit_roundoff(jnp.float64) * max(case.norm, 1) * max(scales)
    bound = propagator * tolerances[0] + tolerances[1] + tolerances[2] + rounding
    assert np.linalg.norm(lhs - rhs) <= bound


@eqx.filter_jit
def _phimv(solver, matrix, vectors, t):
    return solver.phimv(matrix, vectors, t)


@given(case=cases(F64), order=st.integers(0, 2))
def test_phi_recurrence(case, order):
    """phi_j(z) = z phi_{j+1}(z) + 1/j! through `phimv` on operators: with
    `P_j = t^j phi_j(tA) b`, `P_j = A P_{j+1} + t^j / j! b`."""
    t = case.times[-1]
    solver = kx.KrylovExpm(rtol=F64.rtol, throw=False)
    matrix, b = jnp.asarray(case.matrix), jnp.asarray(case.vector)
    zero = jnp.zeros_like(b)

    def term(j):
        vectors = tuple(b if i == j else zero for i in range(4))
        return _phimv(solver, matrix, vectors, jnp.asarray(t))

    low, high = term(order), term(order + 1)
    assume(low.result == kx.RESULTS.successful)
    assume(high.result == kx.RESULTS.successful)
    size = [np.linalg.norm(b) * abs(t) ** j / math.factorial(j) for j in range(4)]
    scale_low = max(np.linalg.norm(low.value), size[order])
    scale_high = max(np.linalg.norm(high.value), size[order + 1])
    a_norm = np.linalg.norm(case.matrix, 2)
    residual = (
        np.asarray(low.value)
        - case.matrix @ np.asarray(high.value)
        - t**order / math.factorial(order) * np.asarray(b)
    )
    growth_low = float(low.stats["growth_factor"])
    growth_high = float(high.stats["growth_factor"])
    bound = 10 * F64.rtol * (growth_low * scale_low + a_norm * growth_high * scale_high)
    bound += (
        10
        * unit_roundoff(jnp.float64)
        * max(case.norm, 1)
        * (scale_low + a_norm * scale_high)
    )
    assert np.linalg.norm(residual) <= bound


# ---------------------------------------------------------------------------------
# Transformations: gradients, vmap, jit.


@eqx.filter_jit
def _grad(matrix, vector, weights, t):
    def loss(matrix, vector):
        value = kx.expmv(matrix, vector, t, rtol=F64.rtol)
        return jnp.vdot(weights, value).real

    return jax.grad(loss, argnums=(0, 1))(matrix, vector)


@jax.jit
def _grad_dense(matrix, vector, weights, t):
    def loss(matrix, vector):
        return jnp.vdot(weights, jsl.expm(t * matrix) @ vector).real

    return jax.grad(loss, argnums=(0, 1))(matrix, vector)


@given(
    case=cases(F64, kinds=KINDS[:-1], max_log_norm=2.0),
    seed=st.integers(0, 2**16),
)
def test_gradients_against_dense_autodiff(case, seed):
    """`jax.grad` with the default adjoint against autodiff of the dense exponential,
    for the operator's matrix and the vector. Tolerance: 100 rtol times the scale of
    the gradient, `|t| max_s |exp(sA)|^2 |w| |v|` for the matrix and
    `max_s |exp(sA)| |w|` for the vector."""
    assume(not np.iscomplexobj(case.matrix))
    t = case.times[-1]
    weights = np.random.default_rng(seed).standard_normal(N)
    args = (
        jnp.asarray(case.matrix),
        jnp.asarray(case.vector),
        jnp.asarray(weights),
        jnp.asarray(t),
    )
    grads = _grad(*args)
    reference = _grad_dense(*args)
    assume(all(np.all(np.isfinite(np.asarray(g))) for g in reference))
    peak = max(
        np.linalg.norm(scipy.linalg.expm(s * t * case.matrix), 2)
        for s in np.linspace(0, 1, 5)
    )
    scales = (abs(t) * peak**2, peak)
    for g, r, scale in zip(grads, reference, scales, strict=True):
        scale = scale * np.linalg.norm(weights) * max(np.linalg.norm(case.vector), 1)
        rounding = 10 * unit_roundoff(jnp.float64) * max(case.norm, 1) * scale
        assert np.linalg.norm(np.asarray(g) - np.asarray(r)) <= (
            100 * F64.rtol * scale + rounding
        ), case.kind


@eqx.filter_jit
def _vmapped(solver, matrices, vectors, times):
    return jax.vmap(solver.expmv, in_axes=(0, 0, None))(matrices, vectors, times)


@given(first=cases(F64), second=cases(F64))
def test_vmap_equals_unbatched(first, second):
    """A batch of two operators under `vmap` (times shared) gives each member's own
    values and result codes."""
    times = first.times
    second = second._replace(times=times)
    solver = kx.KrylovExpm(rtol=F64.rtol, throw=False)
    matrices = jnp.asarray(np.stack([first.matrix, second.matrix]))
    vectors = jnp.asarray(np.stack([first.vector, second.vector]))
    batched = _vmapped(solver, matrices, vectors, jnp.asarray(times))
    for i in range(2):
        single = _expmv(solver, matrices[i], vectors[i], jnp.asarray(times))
        assert batched.result._value[i] == single.result._value
        if single.result == kx.RESULTS.successful:
            np.testing.assert_allclose(
                np.asarray(batched.value[i]),
                np.asarray(single.value),
                rtol=0,
                atol=1e-12 * max(1.0, float(np.max(np.abs(single.value)))),
            )


# Every operation dispatched on its own costs seconds per solve: few examples.
@settings(max_examples=60 if THOROUGH else 1)
@given(case=cases(F64, max_log_norm=1.0))
def test_jit_equals_eager(case):
    """The jitted solve and the same solve with `jax.disable_jit()` (every loop a
    Python loop) agree to rounding."""
    jitted = krylov(F64, case)
    solver = kx.KrylovExpm(rtol=F64.rtol, throw=False)
    with jax.disable_jit():
        eager = solver.expmv(
            jnp.asarray(case.matrix), jnp.asarray(case.vector), jnp.asarray(case.times)
        )
    assert eager.result == jitted.result
    if jitted.result == kx.RESULTS.successful:
        scale = max(1.0, float(np.max(np.abs(jitted.value))))
        np.testing.assert_allclose(
            np.asarray(eager.value),
            np.asarray(jitted.value),
            rtol=0,
            atol=1e-10 * scale,
        )
