"""A state sharded over a device mesh (`krylovexp.ShardedGrid`, a halo-exchange
stencil written with `jax.shard_map`): the same numbers as on one device, the
output sharded as the input, and no gathering of the state in the compiled program.

The checks need 8 devices, whose number XLA reads when JAX starts; each test runs
`tests/sharded_check.py` in a fresh process with 8 simulated CPU devices and asserts
on the JSON it prints.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import krylovexp as kx


SCRIPT = pathlib.Path(__file__).resolve().parent / "sharded_check.py"
# Values and gradients against the single-device run; float32 against float64.
TOL = 1e-12
TOL_FLOAT32 = 1e-3


def run_checks(*names):
    # The suite's compile-time flags (conftest.py) come along in XLA_FLAGS.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *names],
        cwd=SCRIPT.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    return out


def assert_no_gather(report, name):
    """The state is never gathered: no all-gather at all, no collective of a
    device's share of the state or more besides the halo exchange, and every
    loop that applies the operator (a Krylov step) communicates by halo exchanges
    and all-reduces of scalars or short vectors (inner products) only."""
    assert report["sharding_kept"], name
    assert report["gathers"] == [], (name, report["gathers"])
    assert report["large_collectives"] == [], (name, report["large_collectives"])
    steps = report["step_collectives"]
    assert steps, name
    for ops in steps.values():
        for op in ops:
            assert op.startswith(("collective-permute", "all-reduce")), (name, op)


def test_sharded_expmv_and_gradient():
    """Stencil matvecs (corners, halo width 2, rows split over two mesh axes) against
    `np.roll`; `exp(tA)u` of a variable-coefficient diffusion operator and its VJP
    with respect to the coefficient field and `u`, on a 2×4 mesh."""
    out = run_checks("stencils", "expmv")
    for name, error in out["stencils"]["errors"].items():
        assert error < TOL, name
    report = out["expmv"]
    value, kappa_bar, u_bar = report["errors"]
    assert value < TOL and kappa_bar < TOL and u_bar < TOL, report["errors"]
    assert_no_gather(report, "expmv")


@pytest.mark.slow
def test_sharded_phimv_integrators_float32_and_row_mesh():
    """`phimv`; ETDRK4 and Exprb43 through `diffrax.diffeqsolve` (Allen–Cahn);
    `expmv` and its VJP on a 1-D mesh of 8 devices splitting rows; and in float32
    (x64 off, default tolerances) against float64."""
    out = run_checks("phimv", "integrators", "mesh1d", "float32")
    assert out["phimv"]["errors"] < TOL
    assert_no_gather(out["phimv"], "phimv")
    for name, report in out["integrators"].items():
        assert report["result"] == 0, name  # diffrax.RESULTS.successful
        value, result = report["errors"]
        assert value < TOL and result == 0, name
        assert_no_gather(report, name)
    assert max(out["mesh1d"]["errors"]) < TOL, out["mesh1d"]["errors"]
    assert_no_gather(out["mesh1d"], "mesh1d")
    single = out["float32"]
    assert single["dtypes"] == ["float32"] * 3
    assert single["finite"]
    assert max(single["errors"]) < TOL_FLOAT32, single["errors"]
    assert_no_gather(single, "float32")


def _mesh(axis_type=AxisType.Auto):
    return jax.make_mesh((1,), ("x",), axis_types=(axis_type,))


def test_grid_checks():
    """Trace-time errors with a message that says what to do (one device suffices)."""
    with pytest.raises(ValueError, match="AxisType.Auto"):
        kx.ShardedGrid((8, 8), _mesh(AxisType.Explicit), ("x", None))
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        kx.ShardedGrid((8, 8), _mesh(), ("z", None))
    with pytest.raises(ValueError, match="used twice"):
        kx.ShardedGrid((8, 8), _mesh(), ("x", "x"))
    with pytest.raises(ValueError, match="two entries"):
        kx.ShardedGrid((8, 8, 8), _mesh(), ("x", None))
    grid = kx.ShardedGrid((8, 6), _mesh(), ("x", None))
    with pytest.raises(ValueError, match="halo width"):
        grid.stencil(lambda u: u[3:-3, 3:-3], width=7)
    with pytest.raises(ValueError, match="shape"):
        grid.to_blocks(np.zeros((6, 8)))


def test_grid_on_one_device():
    """Block layout round trip, and the diffusion operator: symmetric, zero on
    constants, negative definite on the rest (Lanczos applies)."""
    grid = kx.ShardedGrid((8, 6), _mesh(), ("x", None))
    field = np.arange(48.0).reshape(8, 6)
    blocks = grid.to_blocks(field)
    assert blocks.shape == (1, 1, 8, 6)
    np.testing.assert_array_equal(grid.from_blocks(blocks), field)
    kappa = grid.to_blocks(1 + 0.5 * np.cos(field))
    matrix = np.asarray(grid.laplacian(kappa, (0.5, 0.25)).as_matrix())
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    np.testing.assert_allclose(matrix @ np.ones(48), 0, atol=1e-12)
    assert np.sort(np.linalg.eigvalsh(matrix))[-2] < 0


@pytest.mark.parametrize(
    "devices, n, p, parts",
    [
        (1, 2304, 3, 1),
        (1, 2**18, 3, 1),
        (8, 2304, 3, 8),
        (64, 2304, 3, 32),
        (64, 2304, 4, 32),
        (8, 256, 3, 4),
        (8, 2303, 3, 1),
        (6, 2304, 3, 4),
    ],
)
def test_augmented_vector_parts(monkeypatch, devices, n, p, parts):
    """`phimv` cuts its augmented vectors into at most as many parts as there are
    devices (a power of two dividing `n`, each part's `p` slots within `n / 16`):
    on one device a plain concatenation, whose matvecs need no index arithmetic."""
    from krylovexp._expm import _tail_groups

    monkeypatch.setattr(jax, "device_count", lambda: devices)
    assert _tail_groups(n, p) == parts
