"""The adjoints of `KrylovExpm`, i.e. how its derivatives are computed: the
custom adjoint `KrylovAdjoint` (modes `"solution"` and `"approximation"`,
implemented in `_derivatives.py` and `_backward.py`) or `DirectAdjoint` (autodiff
through the loops). Each one evaluates the sweep in its own way."""

import abc
from typing import Literal

import equinox as eqx

from ._config import _Config
from ._derivatives import evaluate_custom
from ._sweep import _loop


class AbstractKrylovAdjoint(eqx.Module):
    """How reverse-mode (and forward-mode) derivatives are computed. A subclass
    implements `evaluate`: run the adaptive sweep of the flat system
    `system.matvec(params, ·)` from `vector` over `times` and return the outputs (one
    row per time), the result code and the statistics, differentiable as it
    chooses."""

    @abc.abstractmethod
    def evaluate(self, params, vector, times, system, config: _Config):
        """Return `(outputs, result, stats)` of the sweep."""


class KrylovAdjoint(AbstractKrylovAdjoint):
    """Derivatives without differentiating through the loops; the step sizes and
    dimensions chosen by the controller are constants.

    Reverse mode: substep boundaries are stored (start vectors in 16 checkpoints), the
    last substep's Krylov basis is kept when it fits in `basis_rows` rows, every other
    substep's basis is rebuilt on the backward pass, and the memory written per call
    is O(n (basis_rows + 16 + log2(max_substeps / 16))) plus the bases the dimensions
    reached need.

    Forward mode (`jax.jvp`, `jax.jacfwd`, `diffrax.ForwardMode`): the tangent of the
    exact solution, `exp(tA) δv + ∫_0^t exp((t-s)A) δA exp(sA) v ds`, is the top block
    of the exponential of the block operator `[[A, δA], [0, A]]` applied to
    `[δv; v]` (Van Loan 1978), evaluated by one adaptive sweep to the same tolerance
    as the value. Second derivatives need [`krylovexp.DirectAdjoint`][].

    **Arguments:**

    - `mode`: what the gradient is the gradient of.
        - `"solution"` (default): of the exact `exp(τA(θ)) v`, to the tolerance. Per
          substep, the vector cotangent is `exp(τAᵀ) w̄`, by an adaptive Krylov
          evaluation with the transposed matvec, and the parameter cotangent is
          `∫_0^τ ∂θ⟨exp((τ-s)Aᵀ) w̄, A(θ) exp(sA) v⟩ ds`, integrated exactly in the
          product of the two Krylov spaces (a block exponential, Van Loan 1978) and
          paid with VJPs of the matvec over the forward basis.
        - `"approximation"`: of the computed Krylov approximation, exactly (to
          round-off), by the adjoint of the Arnoldi/Lanczos iteration (Krämer,
          Moreno-Muñoz, Roy & Hauberg, NeurIPS 2024): the steps are swept in reverse,
          one VJP of the matvec each. For stiff operators this derivative can be
          wrong by orders of magnitude even when the value meets its tolerance: the
          Krylov polynomial is accurate on the directions `v` excites, but a
          parameter or start-vector perturbation excites rough directions on which
          it does not damp as `exp(τA)` does.
    - `basis_rows`: the memory budget of the backward pass, in basis vectors of the
      state's size (default 32). The forward pass keeps the last substep's basis
      if it has at most this many vectors (so a single-substep gradient rebuilds
      nothing), and the backward pass rebuilds each other substep in that buffer; a
      substep with a larger basis is rebuilt in one of `max_krylov_dim + 1` rows
      (and, for plain Lanczos when the extra rows take at most 4 MiB, its transposed
      sweep in as many), allocated only when one occurs. States whose whole basis
      takes at most 1 MiB always keep it. Raise it to keep larger bases, lower it to
      save memory; `0` keeps none. It changes no value and no gradient, only time and
      memory.
    """

    mode: Literal["solution", "approximation"] = eqx.field(
        default="solution", static=True
    )

    basis_rows: int = eqx.field(default=32, static=True)

    def __check_init__(self):
        if self.mode not in ("solution", "approximation"):
            raise ValueError(
                f"`mode` must be 'solution' or 'approximation', got {self.mode!r}."
            )
        if not isinstance(self.basis_rows, int) or self.basis_rows < 0:
            raise ValueError(
                "`basis_rows` must be a non-negative integer (basis vectors kept "
                f"for the backward pass), got {self.basis_rows!r}."
            )

    def evaluate(self, params, vector, times, system, config: _Config):
        config = config._replace(
            solution_adjoint=self.mode == "solution", basis_rows=self.basis_rows
        )
        return evaluate_custom(params, vector, times, system=system, config=config)


class DirectAdjoint(AbstractKrylovAdjoint):
    """Differentiate through the Krylov loops with JAX's own autodiff (bounded while
    loops). Supports forward mode (`jax.jvp`, `jax.jacfwd`) as well as reverse mode,
    at the price of memory that grows with the number of Krylov steps and substeps.
    """

    def evaluate(self, params, vector, times, system, config: _Config):
        config = config._replace(direct=True)
        final, result, stats = _loop(params, vector, times, system, config, False)
        return final.outputs, result, stats
