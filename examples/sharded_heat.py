"""The heat equation on a state sharded over a device mesh: `exp(TA)u0` and the
gradient of a data misfit with respect to the conductivity field, on several devices
and on one, compared.

    u_t = ∇·(κ(x)∇u)   periodic on [0, 1]²,   κ = exp(θ),
    loss(θ, u0) = ½ Σ (u(T) − d)²,   d = u(T) for the true θ,

discretised by the 5-point finite-volume stencil of `krylovexp.ShardedGrid.laplacian`
(face conductivities the mean of the two cells'), whose matvec exchanges one row or
column of halo with each neighbouring device (`jax.shard_map` + `jax.lax.ppermute`).
The state lives in the grid's block layout, one block per device; `krylovexp.expmv`
keeps it there through the Krylov sweep, the adjoint and the output. The script
prints the agreement of values and gradients with the single-device run, the output
sharding, the collectives of one Krylov step in the compiled program (and whether
anything gathers the state), and timings; it writes `report.json` and
`collectives.txt` into `--out`, and exits non-zero if a check fails.

    python examples/sharded_heat.py                  # 128×128 grid, 2×4 mesh
    python examples/sharded_heat.py --grid 256 --mesh 8x1

Without accelerators it asks XLA for 8 simulated CPU devices (set before JAX starts).
Those share the host's cores, so their timings show the overhead of the
communication, not a speed-up; on a machine with several GPUs or TPUs the same script
runs on them (`--mesh` must multiply to at most the number of devices).
"""

import json
import pathlib
import sys


# The repository root, for the helpers in `support/`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from support.sharding import host_devices, step_collectives  # noqa: E402


# 8 CPU devices unless XLA_FLAGS already says otherwise; must precede JAX's start.
host_devices(8, cpu_only=False)

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.cli import add_common_arguments, resolve_methods  # noqa: E402
from support.measure import rel_err, timed  # noqa: E402
from support.sharding import collectives  # noqa: E402


METHODS = ("sharded", "single")


def parse_args(argv):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(
        p, script="sharded_heat", methods=METHODS, grid=128, grid_help="points per side"
    )
    p.add_argument(
        "--mesh",
        default="2x4",
        help="devices along x and y, e.g. 2x4 (a 2-D mesh) or 8x1 (rows only)",
    )
    p.add_argument("--time", type=float, default=1e-3, help="final time T")
    p.add_argument("--rtol", type=float, default=1e-10, help="krylovexp rtol")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    return p.parse_args(argv)


def make_grid(size, mesh_shape):
    """The grid split over `mesh_shape` devices (axes of size 1 do not split)."""
    count = int(np.prod(mesh_shape))
    devices = jax.devices()
    if count > len(devices):
        raise SystemExit(
            f"--mesh {mesh_shape[0]}x{mesh_shape[1]} needs {count} devices; JAX has "
            f"{len(devices)}. Run the script in a fresh process (it asks for 8 CPU "
            "devices before JAX starts) or set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8."
        )
    mesh = jax.make_mesh(
        mesh_shape, ("x", "y"), axis_types=(AxisType.Auto,) * 2, devices=devices[:count]
    )
    axes = tuple(
        name if n > 1 else None for name, n in zip("xy", mesh_shape, strict=True)
    )
    return kx.ShardedGrid((size, size), mesh, axes)


def problem(size):
    x = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(x, x, indexing="ij")
    theta_true = 0.5 * np.sin(2 * np.pi * xx) * np.cos(2 * np.pi * yy)
    theta_true += 0.3 * np.cos(4 * np.pi * (xx + yy))
    u0 = sum(
        np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.05**2))
        for cx, cy in ((0.3, 0.4), (0.7, 0.6), (0.5, 0.2))
    )
    return theta_true, np.zeros_like(theta_true), u0


def functions(grid, size, cfg, example):
    """The forward map `(θ, u0) ↦ Solution` and the gradient of the misfit, compiled
    for arrays like `example` (θ, u0, data in block layout)."""
    solver = kx.KrylovExpm(rtol=cfg.rtol)
    h = 1.0 / size

    def forward(theta, u0):
        return solver.expmv(grid.laplacian(jnp.exp(theta), h), u0, cfg.time)

    def loss(theta, u0, data):
        return 0.5 * jnp.sum((forward(theta, u0).value - data) ** 2)

    theta, u0, data = example
    compiled = jax.jit(forward).lower(theta, u0).compile()
    gradient = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(theta, u0, data).compile()
    return compiled, gradient


def collapse(steps):
    """Loops with the same collectives, once each, with their number."""
    counts = {}
    for ops in steps.values():
        key = ", ".join(sorted(str(c) for c in ops))
        counts[key] = counts.get(key, 0) + 1
    return [f"{n} loop{'s' if n > 1 else ''}: {key}" for key, n in counts.items()]


def run(name, grid, size, cfg, fields):
    """Values, gradients, timings and the compiled gradient's collectives on one
    grid (`fields`: θ_true, θ, u0 in the field layout)."""
    theta_true, theta, u0 = (
        jax.device_put(grid.to_blocks(f), grid.sharding) for f in fields
    )
    forward, grad = functions(grid, size, cfg, (theta, u0, u0))
    data = forward(theta_true, u0).value
    sol = forward(theta, u0)
    g_theta, g_u0 = grad(theta, u0, data)
    _, forward_s = timed(forward, theta, u0, repeats=cfg.repeats)
    _, grad_s = timed(grad, theta, u0, data, repeats=cfg.repeats)
    hlo = grad.as_text()
    share = size * size // grid.mesh.devices.size
    ok = bool(sol.result == kx.RESULTS.successful)
    return {
        "name": name,
        "devices": int(grid.mesh.devices.size),
        "value": np.asarray(grid.from_blocks(sol.value)),
        "grad_theta": np.asarray(grid.from_blocks(g_theta)),
        "grad_u0": np.asarray(grid.from_blocks(g_u0)),
        "sharding_kept": all(
            a.sharding.is_equivalent_to(grid.sharding, 4)
            for a in (sol.value, g_theta, g_u0)
        ),
        "successful": ok,
        "result": "successful" if ok else kx.RESULTS[sol.result],
        "matvecs": int(sol.stats["num_matvecs"]),
        "substeps": int(sol.stats["num_substeps"]),
        "forward_ms": 1e3 * forward_s,
        "gradient_ms": 1e3 * grad_s,
        "gathers": [
            str(c)
            for c in collectives(hlo)
            if c.op != "collective-permute" and c.size >= share
        ],
        "steps": collapse(step_collectives(hlo)),
    }


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    methods = resolve_methods(cfg.methods, METHODS)
    mesh_shape = tuple(int(d) for d in cfg.mesh.lower().split("x"))
    size = cfg.grid
    fields = problem(size)
    grids = {
        "sharded": lambda: make_grid(size, mesh_shape),
        "single": lambda: make_grid(size, (1, 1)),
    }
    results = {m: run(m, grids[m](), size, cfg, fields) for m in methods}

    rows = [("backend", f"{jax.default_backend()}, {len(jax.devices())} devices")]
    failures = []
    for m, r in results.items():
        label = f"{m} ({r['devices']} device{'s' if r['devices'] > 1 else ''})"
        rows += [
            (f"{label}: result", r["result"]),
            (f"{label}: matvecs / substeps", f"{r['matvecs']} / {r['substeps']}"),
            (
                f"{label}: forward / gradient [ms]",
                "{:.1f} / {:.1f}".format(r["forward_ms"], r["gradient_ms"]),
            ),
        ]
        if not r["successful"]:
            failures.append(f"{m}: {r['result']}")
    agreement = {}
    if "sharded" in results:
        s = results["sharded"]
        rows.append(("sharded: output sharding kept", str(s["sharding_kept"])))
        rows.append(("sharded: state gathered", ", ".join(s["gathers"]) or "never"))
        if not s["sharding_kept"]:
            failures.append("the sharded output lost its sharding")
        if s["gathers"]:
            failures.append("the compiled gradient gathers the state")
    if len(results) == 2:
        s, o = results["sharded"], results["single"]
        for key in ("value", "grad_theta", "grad_u0"):
            agreement[key] = rel_err(s[key], o[key])
            rows.append(
                (f"sharded vs single: {key} rel. error", f"{agreement[key]:.1e}")
            )
            if agreement[key] > 1e-10:
                failures.append(f"{key} differs from the single-device run")

    width = max(len(r[0]) for r in rows)
    print("| quantity".ljust(width + 2) + " | value |")
    print("|" + "-" * (width + 2) + "|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if "sharded" in results:
        print("\nCollectives of the loops that apply the operator (compiled gradient):")
        for line in results["sharded"]["steps"]:
            print("  " + line)

    out = pathlib.Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        m: {k: v for k, v in r.items() if not isinstance(v, np.ndarray)}
        for m, r in results.items()
    }
    report = {"grid": size, "mesh": cfg.mesh, "agreement": agreement, **summary}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if "sharded" in results:
        lines = results["sharded"]["steps"]
        (out / "collectives.txt").write_text("\n".join(lines) + "\n")
    if failures:
        raise SystemExit("sharded_heat check failed: " + "; ".join(failures))
    return {"agreement": agreement, "failures": failures, "results": summary}


if __name__ == "__main__":
    main()
