"""Core checks in single precision, as a user who never enables `jax_enable_x64` gets
it: arrays, Python scalars and default tolerances are all float32/complex64.

These tests run in a process without x64 (`KRYLOVEXP_TEST_X64=0 python -m pytest
tests/test_float32.py`); in the ordinary double-precision run they are skipped and
`test_core_without_x64` starts that process instead. References are float64/complex128
NumPy and SciPy computations.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import scipy.linalg

import krylovexp as kx
from support.measure import rel_err, tol
from support.operators import convection_diffusion_1d, laplacian_1d, random_hermitian
from support.references import expm_ref, phi_ref


X64 = jax.config.jax_enable_x64
single_precision = pytest.mark.skipif(
    X64, reason="single precision: run in a subprocess by test_core_without_x64"
)

N = 40
V = np.random.default_rng(0).standard_normal(N)
NONNORMAL = convection_diffusion_1d(N, velocity=20.0) / 400.0  # ||A|| ~ 10
TOL = tol(jnp.float32)


@pytest.mark.skipif(not X64, reason="this is the test that starts the float32 run")
@pytest.mark.slow
def test_core_without_x64():
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, KRYLOVEXP_TEST_X64="0")
    # `-o addopts=` keeps pytest's summary line, which says how many tests ran.
    command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", __file__]
    run = subprocess.run(
        command + ["-p", "no:cacheprovider"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    # Every single-precision test ran; only this one is skipped there.
    tests = [name for name in globals() if name.startswith("test_")]
    summary = run.stdout.strip().splitlines()[-1]
    expected = rf"\b{len(tests) - 1} passed, 1 skipped\b"
    assert re.search(expected, summary), summary


@single_precision
def test_nonnormal_time_grid():
    assert jnp.asarray(NONNORMAL).dtype == jnp.float32  # nothing enabled x64
    times = jnp.array([0.0, 0.5, 1.5])
    sol = kx.KrylovExpm().expmv(jnp.asarray(NONNORMAL), jnp.asarray(V), times)
    assert sol.result == kx.RESULTS.successful
    assert sol.value.dtype == jnp.float32
    for i, t in enumerate(np.asarray(times)):
        assert rel_err(sol.value[i], expm_ref(NONNORMAL, V, float(t))) < TOL


@single_precision
def test_stiff_symmetric_value_and_gradient():
    """1-D heat equation, ‖tA‖ ≈ 1e3, Lanczos; gradients with respect to a scale s of
    the operator and the start vector against the float64 closed forms
    `dL/ds = 2 uᵀ (tA) u` and `∇_v L = 2 exp(tA)ᵀ u` for `L = Σ u²`,
    `u = exp(s t A) v` at s = 1."""
    n = 60
    lap = laplacian_1d(n, (n + 1) ** 2)
    t = 1e3 / np.linalg.norm(lap, 2)
    x = np.linspace(0, 1, n + 2)[1:-1]
    u0 = np.exp(-40 * (x - 0.4) ** 2) + x * (1 - x)

    def loss(scale, v):
        op = lx.MatrixLinearOperator(scale * jnp.asarray(lap), lx.symmetric_tag)
        return jnp.sum(kx.expmv(op, v, t) ** 2)

    value, (g_scale, g_v) = jax.value_and_grad(loss, argnums=(0, 1))(
        1.0, jnp.asarray(u0)
    )
    u = expm_ref(lap, u0, t)
    assert abs(float(value) - u @ u) < TOL * (u @ u)
    want_scale = 2 * u @ (t * lap @ u)
    assert abs(float(g_scale) - want_scale) < TOL * abs(want_scale)
    assert g_v.dtype == jnp.float32
    assert rel_err(g_v, 2 * scipy.linalg.expm(t * lap).T @ u) < TOL


@single_precision
def test_complex64_schrodinger():
    h = random_hermitian(N, 3) * 5
    psi = (V + 1j * V[::-1]) / np.linalg.norm(V) / np.sqrt(2)
    op = lx.MatrixLinearOperator(jnp.asarray(-1j * h))
    out = kx.expmv(op, jnp.asarray(psi), 4.0)
    assert out.dtype == jnp.complex64
    assert rel_err(out, expm_ref(-1j * h, psi, 4.0)) < TOL
    assert abs(float(jnp.linalg.norm(out)) - 1.0) < TOL


@single_precision
def test_phimv():
    rng = np.random.default_rng(1)
    vectors = tuple(rng.standard_normal(N) for _ in range(3))
    out = kx.phimv(jnp.asarray(NONNORMAL), tuple(map(jnp.asarray, vectors)), 0.8)
    assert out.dtype == jnp.float32
    assert rel_err(out, phi_ref(NONNORMAL, vectors, 0.8)) < TOL
