"""Where the exponential integrator overtakes Tsit5: the reaction–diffusion fit of
`examples/reaction_diffusion_fit.py` (Allen–Cahn `u_t = D Δu + r (u − u³)`, Adam on
`(log D, log r)`) run whole at several grid sizes, each solver in the same process.

Refining the grid makes the diffusion stiffer (`‖D Δ‖ = 8 D / h²`): Tsit5's step count
grows with it, while Exprb43's is set by the reaction dynamics. For each grid and
solver the table gives the accepted-plus-rejected steps of one solve at the starting
parameters, the seconds per Adam (gradient) step, the compile time, the whole fit
(compile plus all Adam steps; the Dopri8 data are not counted) and the parameter
error it reached; the plot draws seconds per fit against the grid size. Rows are kept
in `rows.json` in `--out`: a later run with the same `--out` replaces the rows of the
grids and solvers it measures and keeps the others, so a sweep can be split.

    python benchmarks/bench_rd_crossover.py --grids 48,96,128,160,192 --out out/cx
"""

import argparse
import json
import pathlib
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402
import reaction_diffusion_fit as example  # noqa: E402

from support.cli import comma_list  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grids", type=comma_list(int), default=[48, 96, 128, 160, 192])
    p.add_argument(
        "--methods",
        default="tsit5,exprb43,exprb43-lanczos",
        help=f"comma-separated, from {', '.join(example.METHODS)}",
    )
    p.add_argument("--iters", type=int, default=40, help="Adam steps per fit")
    p.add_argument("--out", default="out/crossover")
    return p.parse_args(argv)


def run(cfg):
    rows = []
    for grid in cfg.grids:
        out = pathlib.Path(cfg.out) / f"grid{grid}"
        result = example.main(
            [
                "--grid",
                str(grid),
                "--iters",
                str(cfg.iters),
                "--methods",
                cfg.methods,
                "--out",
                str(out),
            ]
        )
        truth = np.exp(result["data"]["truth"])
        for name, res in result["results"].items():
            adam_steps = len(res["losses"])  # fewer than `iters` if the fit failed
            rows.append(
                {
                    "iters": cfg.iters,
                    "grid": grid,
                    "norm": result["data"]["norm"],
                    "solver": name,
                    "failed": res["failed"],
                    "steps": res["num_steps"],
                    "sec_per_iter": res["sec_per_iter"],
                    "compile": res["compile"],
                    "fit": res["compile"] + res["sec_per_iter"] * adam_steps,
                    "error": float(np.max(np.abs(res["params"] / truth - 1))),
                }
            )
    return rows


def merge(rows, path):
    """The rows of `path` (if any) that `rows` does not replace, then `rows`, sorted
    by grid."""
    new = {(r["grid"], r["solver"]) for r in rows}
    old = json.loads(path.read_text()) if path.exists() else []
    kept = [r for r in old if (r["grid"], r["solver"]) not in new]
    return sorted(kept + rows, key=lambda r: r["grid"])


def format_table(rows):
    iters = sorted({r["iters"] for r in rows})
    lines = [
        f"Allen–Cahn fit, {'/'.join(map(str, iters))} Adam steps per fit; fit s = "
        "compile + Adam steps (vs Tsit5: that fit time over Tsit5's at the same grid)",
        "",
        "| grid | n | ‖DΔ‖ | solver | solver steps | s/gradient step | compile s | "
        "fit s | vs Tsit5 | param error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tsit5 = {r["grid"]: r["fit"] for r in rows if r["solver"] == "tsit5"}
    for r in rows:
        size = f"{r['grid']}² | {r['grid'] ** 2:,}"
        head = f"| {size} | {r['norm']:.0f} | {r['solver']} |"
        if r["failed"]:
            lines.append(f"{head} failed: {r['failed']} | | | | | |")
            continue
        ratio = f"{r['fit'] / tsit5[r['grid']]:.2f}" if r["grid"] in tsit5 else "–"
        lines.append(
            f"{head} {r['steps']} | {r['sec_per_iter']:.3f} | {r['compile']:.1f} | "
            f"{r['fit']:.1f} | {ratio} | {r['error']:.2e} |"
        )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for solver in dict.fromkeys(r["solver"] for r in rows):
        mine = [r for r in rows if r["solver"] == solver and not r["failed"]]
        ax.loglog(
            [r["grid"] for r in mine], [r["fit"] for r in mine], "o-", label=solver
        )
    grids = sorted({r["grid"] for r in rows})
    ax.set_xticks(grids, [str(g) for g in grids])
    ax.minorticks_off()
    ax.set_xlabel("grid points per side")
    ax.set_ylabel("seconds per fit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    cfg = parse_args(argv)
    out = pathlib.Path(cfg.out)
    rows = merge(run(cfg), out / "rows.json")
    (out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = format_table(rows)
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    plot(rows, out / "crossover.png")
    print("wrote", out / "table.md", "and", out / "crossover.png")


if __name__ == "__main__":
    main()
