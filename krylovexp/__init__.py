"""krylovexp: differentiable Krylov matrix exponentials, phi-functions and
exponential integrators for JAX."""

from ._expm import (
    AbstractKrylovAdjoint as AbstractKrylovAdjoint,
    DirectAdjoint as DirectAdjoint,
    expmv as expmv,
    KrylovAdjoint as KrylovAdjoint,
    KrylovExpm as KrylovExpm,
    phimv as phimv,
)
from ._solution import RESULTS as RESULTS, Solution as Solution


__version__ = "0.1.0"
