"""krylovexp: differentiable Krylov matrix exponentials, phi-functions and
exponential integrators for JAX."""

# Matrix functions: exp(tA)v and the phi-functions, their options, adjoints, results,
# and the exponential as a Lineax operator.
from ._adjoints import (
    AbstractKrylovAdjoint as AbstractKrylovAdjoint,
    DirectAdjoint as DirectAdjoint,
    KrylovAdjoint as KrylovAdjoint,
)
from ._expm import KrylovExpm as KrylovExpm, expmv as expmv, phimv as phimv
from ._host_memory import reuse_host_memory as reuse_host_memory
from ._linear_operator import ExpmLinearOperator as ExpmLinearOperator
from ._solution import RESULTS as RESULTS, Solution as Solution


__version__ = "0.1.0"

# Exponential integrators: solvers and the linear term for Diffrax.
from ._dense_output import ExponentialInterpolation as ExponentialInterpolation
from ._etd import (
    ETDRK2 as ETDRK2,
    ETDRK4 as ETDRK4,
    ExponentialEuler as ExponentialEuler,
    HochOst4 as HochOst4,
    LinearExponential as LinearExponential,
)
from ._rosenbrock import Exprb32 as Exprb32, Exprb43 as Exprb43

# Sharded states: a grid split over a device mesh, with halo-exchange stencils.
from ._sharding import ShardedGrid as ShardedGrid
from ._solver_base import AbstractExponentialSolver as AbstractExponentialSolver
from ._terms import LinearTerm as LinearTerm
