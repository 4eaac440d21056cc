"""Each example's `main` at a tiny size: the quickstart's checks pass, the loss
decreases and the recovered parameters move toward the truth (so the examples cannot
rot)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEST_FLAGS


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_png(path):
    """A PNG file with some content (signature, and more than a blank header)."""
    data = path.read_bytes()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000


def test_quickstart():
    """`python examples/quickstart.py` exits 0: `main` raises SystemExit when a check
    fails. The figures it checks, against dense references and finite differences."""
    quickstart = _load("quickstart")
    out = quickstart.main(["--grid=6", "--repeats=1"])
    assert out["value_error"] < 1e-8
    assert out["grad_error"] < 1e-5
    assert out["fd_error"] < 1e-5


@pytest.mark.slow
def test_quickstart_command_at_default_size():
    """The README's command, `python examples/quickstart.py`, as a user runs it (its
    default 24×24 grid, a fresh process, JAX's default compiler settings): exit
    status 0."""
    # Without the compile-time flags conftest.py sets for the suite.
    flags = os.environ.get("XLA_FLAGS", "").split()
    env = dict(os.environ, XLA_FLAGS=" ".join(f for f in flags if f not in TEST_FLAGS))
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=EXAMPLES.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| result" in run.stdout and "successful" in run.stdout


@pytest.mark.slow
def test_wave_inverse(tmp_path):
    wave = _load("wave_inverse")
    out = wave.main(
        [
            "--grid=8",
            "--num-ics=6",
            "--epochs=12",
            "--hard-epochs=2",
            "--lr=2e-2",
            "--width=8",
            "--methods=kx-fixed-10,kx-adaptive,matfree-10",
            "--hard-methods=kx-fixed-10,kx-adaptive",
            "--no-cross-check",
            f"--out={tmp_path}",
        ]
    )
    assert out["failures"] == []
    for regime in ("mild", "hard"):
        problem = out["problems"][regime]
        for name in out[regime]:
            r = out[regime][name]
            assert np.all(np.isfinite(r["losses"]))
            if regime == "mild":
                # Training makes progress and ω moves toward the truth.
                assert r["losses"][-1] < 0.7 * r["losses"][0], name
                assert r["rmse"] < 0.9 * problem["rmse_init"], name
                assert r["solver_error"] < 1e-8, name
        # Hard regime: the adaptive solve stays accurate, the fixed ones do not, and
        # accuracy costs matvecs.
        if regime == "hard":
            adaptive, fixed = out[regime]["kx-adaptive"], out[regime]["kx-fixed-10"]
            assert adaptive["solver_error"] < 1e-8
            assert fixed["solver_error"] > 1e-3
            assert adaptive["matvecs"] > fixed["matvecs"]
    # Same algorithm, same numbers and the same matvecs: krylovexp at fixed depth 10
    # and matfree.
    ours, theirs = out["mild"]["kx-fixed-10"], out["mild"]["matfree-10"]
    np.testing.assert_allclose(ours["omega"], theirs["omega"], rtol=1e-6)
    assert ours["matvecs"] == theirs["matvecs"]
    for png in ("omega_mild.png", "omega_hard.png", "loss_curves.png"):
        assert _is_png(tmp_path / png)


@pytest.mark.slow
def test_heat_inverse(tmp_path):
    heat = _load("heat_inverse")
    out = heat.main(
        [
            "--grid=10",
            "--sensors=3",
            "--num-sources=2",
            "--iters=12",
            "--methods=krylovexp-lanczos,diffrax-tsit5",
            f"--out={tmp_path}",
        ]
    )
    assert out["failures"] == []
    for r in out["results"].values():
        assert r["losses"][-1] < 0.5 * r["losses"][0], r["name"]
        assert r["errors"][-1] < 0.9 * r["errors"][0], r["name"]
    k, t = out["results"]["krylovexp-lanczos"], out["results"]["diffrax-tsit5"]
    # krylovexp's misfit gradient at the start agrees with the tight-tolerance one.
    assert k["grad_error"] < 1e-4
    # Both solve the same problem to 1e-6 and differentiate the solution, so the
    # iterates agree closely.
    np.testing.assert_allclose(k["theta"], t["theta"], atol=1e-3)
    assert _is_png(tmp_path / "kappa.png")


@pytest.mark.slow
def test_reaction_diffusion_fit(tmp_path):
    rd = _load("reaction_diffusion_fit")
    out = rd.main(
        [
            "--grid=12",
            "--iters=6",
            "--lr=0.1",
            "--methods=tsit5,exprb43,exprb43-lanczos",
            f"--out={tmp_path}",
        ]
    )
    assert out["failures"] == []
    for r in out["results"].values():
        assert r["losses"][-1] < 0.5 * r["losses"][0], r["name"]
        assert r["errors"][-1] < 0.8 * r["errors"][0], r["name"]
    for name in ("exprb43", "exprb43-lanczos"):
        np.testing.assert_allclose(
            out["results"]["tsit5"]["params"],
            out["results"][name]["params"],
            rtol=1e-3,
            err_msg=name,
        )
    assert _is_png(tmp_path / "fit.png")


def test_reaction_diffusion_fourier_variables():
    # The fit in Fourier variables solves the same ODE: its trajectory equals the
    # Krylov path's at the same fixed steps (the Laplacian's symbol is exact).
    import jax
    import jax.numpy as jnp

    rd = _load("reaction_diffusion_fit")
    size = 12
    h = 1.0 / size
    u0 = rd.initial_condition(jax.random.key(0), size)
    ts = jnp.linspace(0.2, 1.0, 5)
    params = jnp.log(jnp.asarray([5e-3, 4.0]))
    ys = {
        name: rd.simulate(name, params, u0, ts, h, 1e-11, steps=10)[0]
        for name in ("etdrk4", "etdrk4-fourier")
    }
    np.testing.assert_allclose(ys["etdrk4-fourier"], ys["etdrk4"], rtol=0, atol=1e-9)
    assert float(jnp.max(jnp.abs(ys["etdrk4"][-1] - u0))) > 0.1  # it moved
    grads = {
        name: jax.grad(
            lambda p, name=name: jnp.sum(
                rd.simulate(name, p, u0, ts, h, 1e-11, steps=10)[0] ** 2
            )
        )(params)
        for name in ("etdrk4", "etdrk4-fourier")
    }
    np.testing.assert_allclose(grads["etdrk4-fourier"], grads["etdrk4"], rtol=1e-7)


@pytest.mark.slow
def test_periodic_varying_coefficient(tmp_path):
    """The varying-coefficient periodic problem at a small size: both methods train,
    the Krylov path recovers the field better than the start, and the picture is
    written."""
    periodic = _load("periodic_varying_coefficient")
    # Eight Adam steps get the field error from 0.37 to about 0.19: the check is
    # that it moves toward the truth, not the full run's 0.1.
    out = periodic.main(
        ["--grid=32", "--iters=8", "--max-field-error=0.3", f"--out={tmp_path}"]
    )
    assert out["failures"] == []
    for r in out["results"].values():
        assert np.all(np.isfinite(r["losses"]))
        assert r["losses"][-1] < 0.5 * r["losses"][0], r["name"]
        assert r["field_error"] < 0.3, r["name"]
    assert _is_png(tmp_path / "field.png")


@pytest.mark.slow
def test_sharded_heat(tmp_path):
    """`python examples/sharded_heat.py` at a small size in a fresh process (it asks
    for 8 CPU devices before JAX starts): it exits 0, which it does only when the
    sharded values and gradients agree with one device, the output stays sharded and
    the compiled gradient gathers nothing; and its report says so."""
    run = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "sharded_heat.py"),
            "--grid=32",
            "--repeats=1",
            f"--out={tmp_path}",
        ],
        cwd=EXAMPLES.parent,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sharded"]["devices"] == 8
    assert report["sharded"]["gathers"] == []
    assert max(report["agreement"].values()) < 1e-10
    assert (tmp_path / "collectives.txt").read_text().count("collective-permute") > 0


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


@pytest.mark.slow
def test_wave_inverse_float32_gradient():
    """The wave study trained in float32 (krylovexp at its default float32
    tolerance): the training gradient at the start is finite and within 1e-3 of the
    float64 one, for the adaptive and the fixed-depth solver."""
    import jax

    from support.measure import rel_err

    wave = _load("wave_inverse")
    cfg = wave.parse_args(["--grid=8", "--num-ics=4", "--width=8", "--no-cross-check"])
    problem = wave.make_problem(cfg, cfg.norm, "mild")
    for name in ("kx-adaptive", "kx-fixed-10"):
        grads = {}
        for dtype in ("float64", "float32"):
            cfg.dtype = dtype
            params, _, _, loss_fn, _, _, (x, y) = wave.training_setup(
                name, problem, cfg
            )
            grads[dtype] = jax.jit(jax.grad(loss_fn))(params, x, y)
        leaves32 = jax.tree.leaves(grads["float32"])
        assert all(leaf.dtype == np.float32 for leaf in leaves32)
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves32)
        assert rel_err(grads["float32"], grads["float64"]) < 1e-3, name
