"""Regression tests: operators on which an earlier version returned a wrong value
flagged successful. Each asserts the public contract (a value within the tolerance,
or a result code that is not `successful`) against an independent reference: a
50-digit mpmath exponential, a closed form, or SciPy.

One compiled solver (3x3, float64, rtol 1e-8) serves the small cases; times and
matrices are traced.
"""

import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

import krylovexp as kx
from support.operators import convection_diffusion_1d
from support.references import phi_ref
from support.solve import expmv_solution, phimv_solution


RTOL = 1e-8
SOLVER = kx.KrylovExpm(rtol=RTOL, throw=False)


def solve(matrix, vector, t, solver=SOLVER):
    # Arrays, not Python floats: `filter_jit` compiles once per static value.
    matrix, vector = jnp.asarray(matrix, float), jnp.asarray(vector, float)
    return expmv_solution(solver, matrix, vector, jnp.asarray(t, float))


def mp_expmv(matrix, vector, t):
    """exp(tA) v with 50 significant digits."""
    with mpmath.workdps(50):
        exp = mpmath.expm(mpmath.matrix((t * np.asarray(matrix)).tolist()))
        out = exp * mpmath.matrix(np.asarray(vector, float).tolist())
        return np.array([float(x) for x in out])


def error_and_scale(value, reference, vector):
    """Absolute 2-norm error and the scale the tolerance refers to."""
    error = np.linalg.norm(np.asarray(value) - reference)
    return error, max(np.linalg.norm(vector), np.linalg.norm(reference))


@pytest.mark.parametrize("coupling", [1e3, 1e12])
def test_tiny_then_huge_subdiagonal(coupling):
    """A tiny first subdiagonal hid a large coupling behind it: accepted at dimension
    1 with relative error 4.6e-6 (coupling 1e3) and 1.0 (1e12), both successful."""
    matrix = [[-3.0, 0, 0], [1e-9, 0, 0], [0, coupling, 0]]
    vector = [1.0, 0, 0]
    sol = solve(matrix, vector, 1.0)
    reference = mp_expmv(matrix, vector, 1.0)
    assert sol.result == kx.RESULTS.successful
    error, scale = error_and_scale(sol.value, reference, vector)
    assert error <= 10 * RTOL * scale
    assert int(sol.stats["num_matvecs"]) == 3  # the whole space, no more


def test_cancelling_squarings_nilpotent():
    """A nilpotent operator in the rotated Krylov basis, [[x, x], [-x, -x]] with x ~
    1e6: the squarings of its small exponential cancelled and the result had
    relative error 1.5e-3, flagged successful. exp(tN) v = v + t N v exactly. The
    value is now right; the growth factor (a product of per-substep norms, which
    compounds the transient growth of each substep) may refuse to vouch for it."""
    matrix = np.zeros((3, 3))
    matrix[1, 0] = 4688051.3695257045
    vector = np.array([1.0, 1.0, 0.0])
    sol = solve(matrix, vector, 0.1)
    exact = vector + 0.1 * matrix @ vector
    error, scale = error_and_scale(sol.value, exact, vector)
    assert error <= 10 * RTOL * scale  # 3.8e-11 relative
    assert sol.result in (kx.RESULTS.successful, kx.RESULTS.error_amplified)


def test_cancelling_squarings_reported():
    """Eigenvalues ±1.53 but a coupling of 3e9: the computed value had norm 2e130
    instead of 3e8, flagged successful. Now the substeps shrink until the squarings
    are trustworthy and the value is right (the growth factor, as above, may refuse
    to vouch for it)."""
    matrix = [[0.0, 0.0, -7.94e-10], [3.921190244269, 0.0, 0.0], [-2936926939.2, 0, 0]]
    vector = [1.0, 0.0, 1.0]
    sol = solve(matrix, vector, 0.1)
    reference = mp_expmv(matrix, vector, 0.1)
    error, scale = error_and_scale(sol.value, reference, vector)
    assert error <= 10 * RTOL * scale  # 2.2e-8 relative
    assert sol.result in (kx.RESULTS.successful, kx.RESULTS.error_amplified)


def test_pascal_error_amplification_reported():
    """The creation operator L (L[i+1, i] = i + 1, exp(tL) e_1 = (t^i)_i), n = 100,
    t = 1: four substeps, each within its tolerance, but early errors grow by ~1e11,
    and the value was off by 15 % with result successful. Now `growth_factor` says
    so and the result code is `error_amplified`; at t = 0.5 (one substep) the value
    is right and the factor 1."""
    n = 100
    matrix = jnp.diag(jnp.arange(1.0, n), -1)
    vector = jnp.zeros(n).at[0].set(1.0)
    sol = expmv_solution(SOLVER, matrix, vector, jnp.asarray([0.5, 1.0]))
    exact = np.stack([0.5 ** np.arange(n), np.ones(n)])
    assert sol.result == kx.RESULTS.error_amplified
    assert float(sol.stats["growth_factor"]) * RTOL >= 1
    error = np.linalg.norm(np.asarray(sol.value)[0] - exact[0])
    assert error <= 10 * RTOL * np.linalg.norm(exact[0])
    single = expmv_solution(SOLVER, matrix, vector, jnp.asarray([0.5, 0.5]))
    assert single.result == kx.RESULTS.successful
    assert float(single.stats["growth_factor"]) == 1.0


def test_phi_small_terms_relative_accuracy():
    """A phi term much smaller than the largest input (one phi_j at a small t, or
    KIOPS-style inputs b_j / t^j) only got the absolute accuracy rtol max_j |b_j|:
    t^3 phi_3(tA) b alone at t = 1e-3 had relative error 1.7e-3 at rtol 1e-8."""
    n = 30
    matrix = jnp.asarray(convection_diffusion_1d(n, 20.0) / 400.0)
    b = jnp.asarray(np.random.default_rng(0).standard_normal(n))
    zero = jnp.zeros(n)
    for t in (1e-3, -1e-2):
        cases = [(zero, zero, zero, b), (zero, b, zero, zero)]
        cases.append(tuple(b / t**j for j in range(4)))
        for vectors in cases:
            sol = phimv_solution(SOLVER, matrix, vectors, jnp.asarray(t))
            reference = phi_ref(np.asarray(matrix), [np.asarray(v) for v in vectors], t)
            assert sol.result == kx.RESULTS.successful
            error = np.linalg.norm(np.asarray(sol.value) - reference)
            assert error <= 10 * RTOL * np.linalg.norm(reference), (t, error)
