"""Smooth random fields on a cell-centred grid of the unit square."""

import jax
import numpy as np


def smooth_fields(key, num: int, size: int, length_scale: float, modes: int):
    """`num` random cosine series `Σ a_kl cos(πkx) cos(πly)` on the cell centres
    `(i + ½)/size`, `a_kl ~ N(0, s_kl²)` with the Gaussian spectrum
    `s_kl = exp(−(πℓ)² (k² + l²) / 4)` and `a_00 = 0`: samples of a stationary Gaussian
    process with a squared-exponential kernel of length scale ℓ (up to the mode
    cut-off), with zero normal derivative on the boundary. Each field is normalised to
    unit max-abs.

    **Returns:** a NumPy array of shape `(num, size, size)`.
    """
    x = (np.arange(size) + 0.5) / size
    k = np.arange(modes)
    basis = np.cos(np.pi * np.outer(k, x))  # (modes, size)
    scale = np.exp(
        -((np.pi * length_scale) ** 2) * (k[:, None] ** 2 + k[None] ** 2) / 4
    )
    scale[0, 0] = 0.0
    coef = np.asarray(jax.random.normal(key, (num, modes, modes))) * scale
    fields = np.einsum("nkl,ki,lj->nij", coef, basis, basis)
    return fields / np.max(np.abs(fields), axis=(1, 2), keepdims=True)
