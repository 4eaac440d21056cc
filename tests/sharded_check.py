"""Sharded krylovexp against the same computation on one device, on 8 simulated CPU
devices. Run by `tests/test_sharding.py` in a fresh process (the device count must
be set before JAX starts):

    python tests/sharded_check.py expmv float32 phimv integrators mesh1d

prints one JSON object with, per check: relative errors against the single-device
run, whether each output kept its input's sharding, and the collectives of the
compiled program (every all-gather, every collective of a device's share of the state
or more, and those of the loop bodies that apply the operator, i.e. of one Krylov
step). The assertions live in the test.

The problems: a periodic 32×32 grid with a smooth coefficient field κ, split over a
2×4 mesh (blocks of 16×8 points) or over 8 devices along rows; `exp(tA)u` of the
diffusion operator `∇·(κ∇u)` (‖tA‖ ≈ 25) and its VJP with respect to κ and `u`;
`phimv` with three vectors; Allen–Cahn `u' = εΔu + u − u³` through
`diffrax.diffeqsolve` with `ETDRK4` (constant steps) and `Exprb43` (PID steps).
"""

import json
import pathlib
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from support.sharding import collectives, host_devices, step_collectives  # noqa: E402


host_devices(8)

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import krylovexp as kx  # noqa: E402
from support.measure import rel_err  # noqa: E402


jax.config.update("jax_enable_x64", True)

N = 32
H = 1.0 / N
T = 0.002
# One bucket of basis buffers (see `arnoldi.row_buckets`): small programs, quick to
# compile; the sweep takes more substeps instead.
KRYLOV = dict(max_krylov_dim=30)


def make_grid(shape, names, axes, devices=None):
    mesh = jax.make_mesh(
        shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )
    return kx.ShardedGrid((N, N), mesh, axes)


GRIDS = {
    "2x4": lambda: make_grid((2, 4), ("x", "y"), ("x", "y")),
    "8x1": lambda: make_grid((8,), ("x",), ("x", None)),
    "single": lambda: make_grid((1,), ("x",), (None, None), jax.devices()[:1]),
}


def fields(dtype):
    x = (np.arange(N) + 0.5) / N
    xx, yy = np.meshgrid(x, x, indexing="ij")
    kappa = 1 + 0.5 * np.sin(2 * np.pi * xx) * np.cos(2 * np.pi * yy)
    u0 = np.exp(-((xx - 0.4) ** 2 + (yy - 0.6) ** 2) / 0.02)
    u0 = u0 + 0.1 * np.random.default_rng(0).standard_normal((N, N))
    weight = np.cos(2 * np.pi * xx) + yy
    return [f.astype(dtype) for f in (kappa, u0, weight)]


def on(grid, *arrays):
    """The fields in block layout, put on the grid's devices."""
    return [jax.device_put(grid.to_blocks(a), grid.sharding) for a in arrays]


def large(hlo, share):
    """Collectives other than the halo exchange (`collective-permute`) whose result
    has at least `share` entries (a device's share of the state): an all-gather of
    the state, or an all-reduce of a vector of its length."""
    return [
        str(c)
        for c in collectives(hlo)
        if c.op != "collective-permute" and c.size >= share
    ]


def run(fn, grid, *arrays):
    """Compile `fn` for arrays in the grid's block layout and run it; the outputs
    back in the field layout (NumPy), whether every output kept its input's
    sharding, and the compiled program's collectives."""
    inputs = on(grid, *arrays)
    compiled = jax.jit(fn).lower(*inputs).compile()
    outputs = compiled(*inputs)
    kept = all(
        o.sharding.is_equivalent_to(grid.sharding, o.ndim)
        for o in jax.tree.leaves(outputs)
        if o.ndim == 4
    )
    as_fields = jax.tree.map(
        lambda o: np.asarray(grid.from_blocks(o)) if o.ndim == 4 else np.asarray(o),
        outputs,
    )
    hlo = compiled.as_text()
    steps = step_collectives(hlo)
    report = {
        "sharding_kept": bool(kept),
        "large_collectives": large(hlo, N * N // grid.mesh.devices.size),
        "gathers": [str(c) for c in collectives(hlo) if c.op == "all-gather"],
        "step_collectives": {k: [str(c) for c in v] for k, v in steps.items()},
    }
    return as_fields, report


def compare(make, grid_name, *arrays):
    """`make(grid)` on the named grid and on one device: the sharded run's report,
    with the relative errors of its outputs against the single-device ones."""
    grid, one = GRIDS[grid_name](), GRIDS["single"]()
    sharded, report = run(make(grid), grid, *arrays)
    single, _ = run(make(one), one, *arrays)
    errors = jax.tree.map(rel_err, sharded, single)
    return dict(report, errors=errors), sharded


def expm_and_vjp(grid):
    """`u(T) = exp(T A(κ)) u0` and the VJP of `u(T)` with cotangent `weight`."""

    def fn(kappa, u0, weight):
        def forward(kappa, u0):
            return kx.expmv(grid.laplacian(kappa, H), u0, T, **KRYLOV)

        u, vjp = jax.vjp(forward, kappa, u0)
        return (u, *vjp(weight))

    return fn


def check_expmv(grid_name="2x4"):
    report, _ = compare(expm_and_vjp, grid_name, *fields(np.float64))
    return report


def check_float32():
    """Float64 and float32 runs on the 2×4 mesh; then float32 must give finite
    values and gradients within 1e-3 of float64, at default tolerances."""
    grid = GRIDS["2x4"]()
    double, _ = run(expm_and_vjp(grid), grid, *fields(np.float64))
    jax.config.update("jax_enable_x64", False)
    try:
        single, report = run(expm_and_vjp(grid), grid, *fields(np.float32))
    finally:
        jax.config.update("jax_enable_x64", True)
    return dict(
        report,
        dtypes=[str(x.dtype) for x in single],
        finite=bool(all(np.all(np.isfinite(x)) for x in single)),
        errors=[rel_err(a, b) for a, b in zip(single, double, strict=True)],
    )


def phi_combination(grid):
    def fn(kappa, u0, weight):
        vectors = (u0, jnp.sin(u0), weight)
        return kx.phimv(grid.laplacian(kappa, H), vectors, T, **KRYLOV)

    return fn


def check_phimv():
    report, _ = compare(phi_combination, "2x4", *fields(np.float64))
    return report


def allen_cahn(grid, solver, controller):
    """Allen–Cahn `u' = εΔu + u − u³` from `u0` to t = 0.5 (ε = 0.01 is `args`)."""

    def fn(kappa, u0, weight):
        del kappa, weight
        laplacian = grid.laplacian(None, H)
        terms = diffrax.MultiTerm(
            kx.LinearTerm(lambda eps: eps * laplacian),
            diffrax.ODETerm(lambda t, y, eps: y - y**3),
        )
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            0.5,
            0.125,
            0.5 * u0,
            args=jnp.asarray(0.01, u0.dtype),
            stepsize_controller=controller,
            max_steps=64,
            # Diffrax's own check (`throw=True`) would gather the solution.
            throw=False,
        )
        return sol.ys[-1], sol.result._value

    return fn


def check_integrators():
    tight = kx.KrylovExpm(rtol=1e-10, **KRYLOV)
    cases = {
        "ETDRK4": (kx.ETDRK4(krylov=tight), diffrax.ConstantStepSize()),
        "Exprb43": (
            kx.Exprb43(rtol=1e-6, atol=1e-8, krylov=tight),
            diffrax.PIDController(rtol=1e-6, atol=1e-8),
        ),
    }
    report = {}
    for name, (solver, controller) in cases.items():
        rep, sharded = compare(
            lambda grid: allen_cahn(grid, solver, controller),  # noqa: B023
            "2x4",
            *fields(np.float64),
        )
        report[name] = dict(rep, result=int(sharded[1]))
    return report


def roll_stencil(u, offsets):
    """`Σ w u(i + di, j + dj)` for `offsets = {(di, dj): w}`, periodic."""
    return sum(
        w * np.roll(u, (-di, -dj), axis=(0, 1)) for (di, dj), w in offsets.items()
    )


NINE_POINT = {(0, 0): -20.0, **{o: 4.0 for o in ((1, 0), (-1, 0), (0, 1), (0, -1))}}
NINE_POINT.update({o: 1.0 for o in ((1, 1), (1, -1), (-1, 1), (-1, -1))})
# A width-2 stencil (fourth-order Laplacian along x, one-sided mixed term along y).
WIDE = {(0, 0): -2.5, (2, 0): -1 / 12, (-2, 0): -1 / 12, (1, 0): 4 / 3}
WIDE.update({(-1, 0): 4 / 3, (0, 2): 0.5, (-2, -2): 0.25})


def local_stencil(offsets, width):
    """The same stencil on a block padded by `width`."""

    def fn(u):
        bx, by = u.shape[0] - 2 * width, u.shape[1] - 2 * width
        return sum(
            w * u[width + di : width + di + bx, width + dj : width + dj + by]
            for (di, dj), w in offsets.items()
        )

    return fn


def check_stencils():
    """Matvecs of stencils with corners (9-point) and of halo width 2, on the 2×4
    mesh, on rows split over both mesh axes at once, and on one device, against
    `np.roll`; and the variable-coefficient Laplacian against its formula."""
    grids = {
        "2x4": GRIDS["2x4"](),
        "rows over x and y": make_grid((2, 4), ("x", "y"), (("x", "y"), None)),
        "single": GRIDS["single"](),
    }
    kappa, u, _ = fields(np.float64)
    face = lambda axis: 0.5 * (kappa + np.roll(kappa, -1, axis))  # noqa: E731
    flux = lambda axis: face(axis) * (np.roll(u, -1, axis) - u)  # noqa: E731
    expected = {
        "nine_point": roll_stencil(u, NINE_POINT),
        "wide": roll_stencil(u, WIDE),
        "laplacian": sum(flux(a) - np.roll(flux(a), 1, a) for a in (0, 1)) / H**2,
    }
    errors = {}
    for name, grid in grids.items():
        k, v = on(grid, kappa, u)
        ops = {
            "nine_point": grid.stencil(local_stencil(NINE_POINT, 1), dtype=v.dtype),
            "wide": grid.stencil(local_stencil(WIDE, 2), width=2, dtype=v.dtype),
            "laplacian": grid.laplacian(k, H),
        }
        if name != "2x4":  # the other layouts: the stencils with corners only
            ops = {"nine_point": ops["nine_point"], "wide": ops["wide"]}
        for key, op in ops.items():
            out = np.asarray(grid.from_blocks(jax.jit(lambda v: op.mv(v))(v)))  # noqa: B023
            errors[f"{name}: {key}"] = rel_err(out, expected[key])
    return {"errors": errors}


CHECKS = {
    "stencils": check_stencils,
    "expmv": check_expmv,
    "mesh1d": lambda: check_expmv("8x1"),
    "float32": check_float32,
    "phimv": check_phimv,
    "integrators": check_integrators,
}


if __name__ == "__main__":
    names = sys.argv[1:] or list(CHECKS)
    out = {"devices": len(jax.devices())}
    for name in names:
        out[name] = CHECKS[name]()
    print(json.dumps(out))
