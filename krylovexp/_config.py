"""The static configuration of one Krylov evaluation, `_Config`: resolved from the
options of `KrylovExpm` (`KrylovExpm._config`) and passed down to the sweep, its
substeps and the backward pass."""

from typing import NamedTuple

from . import _arnoldi as arnoldi


class _Config(NamedTuple):
    max_dim: int
    min_dim: int
    max_substeps: int
    rtol: float
    atol: float
    orth: arnoldi.Orthogonalisation
    corrected: bool
    throw: bool = False
    # Set by the adjoint's `evaluate`: loops JAX can differentiate (`DirectAdjoint`),
    # and the adjoint of the exact solution (`KrylovAdjoint(mode="solution")`).
    direct: bool = False
    solution_adjoint: bool = False
    # Set by `KrylovAdjoint`: basis rows the backward pass keeps and rebuilds in (see
    # `_sweep.kept_rows`).
    basis_rows: int = 32
    # How the loops run under `vmap`: "sequential" or "batched" (see `_batching`).
    batching: str = "sequential"
    batch_size: int | None = None
