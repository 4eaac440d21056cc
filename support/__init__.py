"""Helpers shared by the tests, the benchmarks and the examples; not part of the
library (the `krylovexp` package does not depend on it and does not ship it).

- `support.measure`: relative errors, test tolerances, timing, compiled memory.
- `support.references`: dense SciPy references for `exp(tA)v` and the φ-functions.
- `support.operators`: small test operators (1-D Laplacian, convection–diffusion,
  random Hermitian matrices, variable diffusion).
- `support.problems`: the 2-D heat and advection–diffusion benchmark problems, and the
  1-D variable-diffusion gradient problem.
- `support.fields`: smooth random fields (Gaussian-spectrum cosine series).
- `support.peers`: the matfree Krylov exponential used as a peer.
- `support.cli`: the command-line style shared by examples and benchmarks.
- `support.sharding`: simulated CPU devices, and the collectives of a compiled
  program (the sharding test and example).

Tests import it through pytest's `pythonpath` setting; scripts run as
`python examples/x.py` or `python benchmarks/x.py` put the repository root on `sys.path`
themselves.
"""
