"""The small dense routines behind every error check, against independent references:
the exponential of a small matrix (both squaring loops) against `scipy.linalg.expm`,
and the norm of the projected propagator against the 2-norm from an SVD."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from krylovexp import _projected as projected


def _hessenberg(size, scale, seed):
    rng = np.random.default_rng(seed)
    return scale * np.triu(rng.standard_normal((size, size)), -1)


@pytest.mark.parametrize("scale", [0.1, 3.0, 200.0])
@pytest.mark.parametrize("differentiable", [True, False])
def test_expm_small_against_scipy(scale, differentiable):
    """No squaring (norm below 1), a few, and many: both loops give the exponential."""
    matrix = _hessenberg(12, scale, seed=1)
    # A dissipative shift keeps the exponential of the large case representable.
    matrix -= np.eye(12) * np.abs(np.linalg.eigvals(matrix).real).max()
    reference = scipy.linalg.expm(matrix)
    value = np.asarray(projected.expm_small(jnp.asarray(matrix), differentiable))
    assert np.linalg.norm(value - reference) / np.linalg.norm(reference) < 1e-11


@pytest.mark.parametrize("dim", [1, 5, 11])
def test_spectral_norm_of_the_propagator(dim):
    """`||exp(tau H_k)||_2` of a non-normal Hessenberg block: a lower bound within a
    few per cent of the SVD's."""
    hessenberg = _hessenberg(12, 1.5, seed=dim)
    padded = np.zeros((12, 12))
    padded[:dim, :dim] = scipy.linalg.expm(hessenberg[:dim, :dim])
    padded[dim:, dim:] = 7.0  # beyond the dimension: must be ignored
    exact = np.linalg.norm(padded[:dim, :dim], 2)
    estimate = float(projected._spectral_norm(jnp.asarray(padded), jnp.asarray(dim)))
    assert exact * 0.97 <= estimate <= exact * (1 + 1e-12)


def test_weak_coupling_lift_against_a_running_maximum():
    """The scale each subdiagonal entry is measured against is the largest entry of
    the columns up to it (a running maximum)."""
    extended = _hessenberg(9, 1.0, seed=3)
    extended[3, 2] = 1e-6  # weak against a column maximum of order 1
    extended[6, 5] = 1e-8
    dim = 7
    lift = float(projected._weak_coupling_lift(jnp.asarray(extended), dim))
    seen = np.maximum.accumulate(np.abs(extended).max(axis=0))
    expected = 1.0
    for i in range(dim):
        sub = abs(extended[i + 1, i])
        floor = projected._COUPLING_FLOOR * seen[i]
        if 0 < sub < floor:
            expected *= floor / sub
    assert expected > 1e8
    assert abs(lift / expected - 1) < 1e-12
