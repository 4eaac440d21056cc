"""The GPU run: every GPU figure of the project in one command, within 8 minutes.

Stages, each a subprocess with its own time limit (a stage that runs past it is killed,
recorded as timed out, and the run goes on with the next one), all inside one overall
budget (`--budget`, 470 s by default, so that the whole run fits in 8 minutes including
compilation):

1. install: checks that the runtime dependencies import, then
   `pip install --no-index --no-build-isolation --no-deps -e .` (no network needed);
   if that fails the run goes on with the working tree on `PYTHONPATH`.
2. environment: jax version, backend and devices, package versions. Without a GPU
   backend the run stops here unless `--allow-cpu` is given.
3. `benchmarks/bench_expm.py`, problems A and B at 256² and at 512², in float64
   (rtols 1e-4, 1e-8) and in float32 (rtol 1e-4), against a float64 Dopri8 reference
   computed on the device; krylovexp with the peers that are cheap enough there.
4. The wave study of `examples/wave_inverse.py` at the paper's size (128² grid, 256
   initial conditions, mild regime) for krylovexp adaptive, krylovexp at fixed depth
   10 and Diffrax Dopri5 + BacksolveAdjoint, a few epochs after compilation: seconds
   per epoch beside the paper's Table 4 (V100).
5. `benchmarks/bench_batching.py` at 128², B = 1, 64, 256: `vmap` throughput of
   `KrylovExpm(batching="sequential")` against `batching="batched"`, forward and
   gradient.

Everything goes into one Markdown file, `<out>/gpu_results.md` (rewritten after every
stage), with each stage's command, status and wall time; the logs are in
`<out>/logs/`. `--quick --allow-cpu` runs the same stages at toy sizes, to check the
script on a CPU.

    python benchmarks/gpu.py                       # on the GPU machine
    python benchmarks/gpu.py --quick --allow-cpu   # a check on a CPU (a few minutes)
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]

# The paper's Table 4 (Krämer et al., NeurIPS 2024): seconds per epoch on a V100,
# 128² grid, 256 initial conditions.
PAPER_TABLE4 = {
    "kx-fixed-10": ("Arnoldi, k = 10", 0.077),
    "dopri5-backsolve": ("Dopri5 + BacksolveAdjoint", 0.072),
    "tsit5-checkpoint": ("Tsit5 + RecursiveCheckpointAdjoint", 0.27),
}
RUNTIME_DEPS = ("jax", "equinox", "lineax", "diffrax", "numpy", "jaxtyping")
BENCH_DEPS = ("scipy", "matfree", "optax", "matplotlib")

ENV_REPORT = """
import importlib, json, sys
import jax
report = {"python": sys.version.split()[0], "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "packages": {}}
for name in ("jaxlib", "equinox", "lineax", "diffrax", "optax", "matfree", "scipy",
             "numpy", "krylovexp"):
    try:
        module = importlib.import_module(name)
        report["packages"][name] = getattr(module, "__version__", "?") + (
            f" ({module.__file__})" if name == "krylovexp" else "")
    except Exception as e:
        report["packages"][name] = f"MISSING ({type(e).__name__}: {e})"
print(json.dumps(report))
"""


@dataclasses.dataclass
class Stage:
    name: str
    title: str
    argv: list
    limit: float
    out: str | None = None  # the stage's output folder (tables), if any
    note: str = ""
    status: str = "not run"
    wall: float = float("nan")
    log: str = ""


def stages(args, out: pathlib.Path) -> list[Stage]:
    py = sys.executable
    quick = args.quick
    expm = str(ROOT / "benchmarks" / "bench_expm.py")
    wave = str(ROOT / "examples" / "wave_inverse.py")
    small, large = (10, 12) if quick else (256, 512)
    result = []
    # (grid, dtype, methods, rtols, limit seconds, note)
    plan = [
        (small, "float64", "krylovexp,matfree,tsit5", "1e-4,1e-8", 80, ""),
        (small, "float32", "krylovexp,tsit5", "1e-4", 55, ""),
        (large, "float64", "krylovexp,matfree", "1e-4,1e-8", 85, "no Diffrax"),
        (large, "float32", "krylovexp", "1e-4", 55, "no Diffrax"),
    ]
    if quick:  # toy sizes; the CPU compiles slowly, so fewer methods and rtols
        plan = [
            (small, "float64", "krylovexp,tsit5", "1e-4", 150, ""),
            (small, "float32", "krylovexp", "1e-4", 100, ""),
            (large, "float64", "krylovexp", "1e-4", 100, ""),
            (large, "float32", "krylovexp", "1e-4", 100, ""),
        ]
    peers_note = {
        "no Diffrax": "Diffrax Tsit5/Dopri5 left out at 512²: their explicit "
        "stability limit needs about ‖TA‖₂/3.3 ≈ 6,400 steps there, above the "
        "benchmark's max_steps = 4096. ",
    }
    wave_stage = None
    for grid, dtype, methods, rtols, limit, note in plan:
        name = f"expm_{grid}_{dtype}"
        folder = out / name
        result.append(
            Stage(
                name=name,
                title=f"bench_expm: problems A, B at {grid}², {dtype}",
                argv=[
                    py,
                    expm,
                    "--grid",
                    str(grid),
                    "--problems",
                    "A,B",
                    "--dtype",
                    dtype,
                    "--rtols",
                    rtols,
                    "--methods",
                    methods,
                    "--reference",
                    "dopri8",
                    "--repeats",
                    "3",
                    "--out",
                    str(folder),
                ],
                limit=limit,
                out=str(folder),
                note=peers_note.get(note, "")
                + (
                    "matfree left out in float32: with jax_enable_x64 on, its VJP "
                    "fails on float32 inputs (float64 cotangent)."
                    if dtype == "float32"
                    else ""
                ),
            )
        )
        if grid == small and dtype == "float32":  # the headline before the 512² runs
            grid_w, ics, epochs = (12, 4, 2) if quick else (128, 256, 20)
            folder = out / "wave"
            wave_stage = Stage(
                name="wave",
                title=f"wave study at {grid_w}², {ics} initial conditions",
                argv=[
                    py,
                    wave,
                    "--grid",
                    str(grid_w),
                    "--num-ics",
                    str(ics),
                    "--epochs",
                    str(epochs),
                    "--lr",
                    "2e-4",
                    "--regimes",
                    "mild",
                    "--methods",
                    "kx-adaptive,kx-fixed-10,dopri5-backsolve",
                    "--no-count-matvecs",
                    "--out",
                    str(folder),
                ],
                limit=200 if quick else 165,
                out=str(folder),
                note="float64 (the example's precision); matvecs per epoch not "
                "counted (one compilation less per method).",
            )
            result.append(wave_stage)
    grids, batches = ("16", "1,8") if quick else ("128", "1,64,256")
    folder = out / "batching"
    result.append(
        Stage(
            name="batching",
            title=f"bench_batching: vmap over B heat problems at {grids}², "
            "sequential against batched",
            argv=[
                py,
                str(ROOT / "benchmarks" / "bench_batching.py"),
                "--grids",
                grids,
                "--batches",
                batches,
                "--repeats",
                "3",
                "--out",
                str(folder),
            ],
            limit=150 if quick else 60,
            out=str(folder),
            note="the batched mode's target on a GPU: at least 10× the sequential "
            "throughput at B = 64.",
        )
    )
    return result


def run_stage(stage: Stage, env, logdir: pathlib.Path, limit: float) -> None:
    """Run `stage.argv` with a time limit, its output to `logs/<name>.log`."""
    log = logdir / f"{stage.name}.log"
    stage.log = str(log)
    print(f"\n=== {stage.name}: {stage.title} (limit {limit:.0f} s)", flush=True)
    print("    " + shlex.join(stage.argv), flush=True)
    tic = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            stage.argv,
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            rc = proc.wait(timeout=max(limit, 1))
            stage.status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stage.status = f"TIMED OUT after {limit:.0f} s"
    stage.wall = time.perf_counter() - tic
    print(f"    {stage.status}, {stage.wall:.1f} s", flush=True)


def tail(path, lines=15) -> str:
    try:
        text = pathlib.Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def install(env, skip: bool) -> str:
    """Check the runtime dependencies, then an editable install without network."""
    missing = [m for m in RUNTIME_DEPS if importlib.util.find_spec(m) is None]
    missing_bench = [m for m in BENCH_DEPS if importlib.util.find_spec(m) is None]
    lines = []
    if missing:
        lines.append(f"runtime dependencies MISSING: {', '.join(missing)}")
    if missing_bench:
        lines.append(f"benchmark dependencies MISSING: {', '.join(missing_bench)}")
    if missing or skip:
        why = "--no-install" if skip else "the stages will fail on the imports"
        lines.append(f"editable install skipped ({why})")
        lines.append(f"the stages get `PYTHONPATH={ROOT}` (the working tree)")
        return "; ".join(lines)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index"]
    cmd += ["--no-build-isolation", "--no-deps", "-e", str(ROOT)]
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
        )
        ok = done.returncode == 0
        text = (done.stderr + done.stdout).strip().splitlines()
        errors = [t.strip() for t in text if t.lower().lstrip().startswith("error")]
        why = " / ".join(errors[:2] or text[-1:])[:300]
        lines.append(
            f"`{shlex.join(cmd[2:])}`: " + ("done" if ok else f"failed ({why})")
        )
    except (subprocess.TimeoutExpired, OSError) as e:
        lines.append(f"editable install failed ({type(e).__name__})")
    lines.append(f"the stages also get `PYTHONPATH={ROOT}` (the working tree)")
    return "; ".join(lines)


# ----------------------------------------------------------------------- the report


def wave_comparison(stage: Stage) -> list[str]:
    path = pathlib.Path(stage.out) / "timings.json"
    if not path.exists():
        return [f"No timings ({stage.status}); see the log tail below."]
    data = json.loads(path.read_text())
    regime = data["regimes"].get("mild")
    if regime is None:
        return ["No 'mild' regime in the timings."]
    lines = [
        f"Backend {data['backend']}, grid {data['grid']}², {data['num_ics']} initial "
        f"conditions, {regime['epochs']} timed epochs after compilation, ‖TA‖₂ = "
        f"{regime['norm']:.3g}. s/epoch: mean and median over the timed epochs "
        "(full batch, one gradient step per epoch); compile: seconds of the AOT "
        "compilation of one training step, not included.",
        "",
        "| method | s/epoch (mean) | s/epoch (median) | compile s | paper, V100 "
        "(Table 4) | paper s/epoch | status |",
        "|---|---|---|---|---|---|---|",
    ]
    methods = regime["methods"]
    names = list(methods) + [m for m in PAPER_TABLE4 if m not in methods]
    for name in names:
        paper, paper_s = PAPER_TABLE4.get(name, ("–", None))
        paper_s = "–" if paper_s is None else f"{paper_s:.3f}"
        r = methods.get(name)
        if r is None:
            lines.append(f"| {name} | not run | | | {paper} | {paper_s} | |")
            continue

        def num(x, spec):
            return "–" if x is None or x != x else format(x, spec)

        lines.append(
            f"| {name} | {num(r['sec_per_epoch'], '.4f')} "
            f"| {num(r['median_sec_per_epoch'], '.4f')} "
            f"| {num(r['compile'], '.1f')} | {paper} | {paper_s} | "
            f"{'ok' if not r['failed'] else r['failed']} |"
        )
    return lines


def write_report(path, args, info, install_note, stage_list, started, t0) -> None:
    elapsed = time.perf_counter() - t0
    lines = [
        "# krylovexp GPU run",
        "",
        f"Started {started} on {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs); command `{shlex.join(sys.argv)}`"
        + (" (**--quick**: toy sizes, not the GPU figures)" if args.quick else "")
        + f"; wall time so far {elapsed:.0f} s of a {args.budget:.0f} s budget.",
        "",
        "## Environment",
        "",
        f"- install: {install_note}",
    ]
    if info:
        lines += [
            f"- python {info['python']}, jax {info['jax']}, backend "
            f"**{info['backend']}**, devices: {', '.join(info['devices'])}",
        ]
        lines += [f"- {k}: {v}" for k, v in info["packages"].items()]
    lines += [
        "",
        "## Stages",
        "",
        "| stage | status | wall s | limit s | command |",
        "|---|---|---|---|---|",
    ]
    for s in stage_list:
        cmd = shlex.join(
            [pathlib.Path(a).name if a == sys.executable else a for a in s.argv]
        )
        cmd = cmd.replace(str(ROOT) + "/", "")
        wall = "–" if s.wall != s.wall else f"{s.wall:.1f}"
        lines.append(f"| {s.name} | {s.status} | {wall} | {s.limit:.0f} | `{cmd}` |")
    for s in stage_list:
        lines += ["", f"## {s.title}", "", f"Stage `{s.name}`: {s.status}."]
        if s.note:
            lines += ["", s.note]
        if s.name == "wave":
            lines += ["", "### Seconds per epoch against the paper's Table 4", ""]
            lines += wave_comparison(s)
        table = pathlib.Path(s.out) / "table.md" if s.out else None
        if table is not None and table.exists() and s.status != "not run":
            partial = "" if s.status == "ok" else " (as far as it got)"
            lines += ["", f"Table{partial}:", "", table.read_text().rstrip()]
        if s.status not in ("ok", "not run"):
            lines += ["", f"Log tail (`{s.log}`):", "", "```", tail(s.log), "```"]
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/gpu", help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a CPU check)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="go on without a GPU backend"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="skip the editable install (on a shared environment)",
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="overall seconds (470; quick 900)"
    )
    args = parser.parse_args()
    if args.budget is None:
        args.budget = 900.0 if args.quick else 470.0
    t0 = time.perf_counter()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    out = (ROOT / args.out) if not os.path.isabs(args.out) else pathlib.Path(args.out)
    logdir = out / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    report = out / "gpu_results.md"

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("MPLBACKEND", "Agg")
    env["PYTHONUNBUFFERED"] = "1"

    install_note = install(env, args.no_install)
    print("install:", install_note, flush=True)

    probe = subprocess.run(
        [sys.executable, "-c", ENV_REPORT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    info = None
    if probe.returncode == 0:
        info = json.loads(probe.stdout.strip().splitlines()[-1])
        print(
            f"jax {info['jax']}, backend {info['backend']}, devices {info['devices']}"
        )
    stage_list = stages(args, out)
    if info is None:
        install_note += f"; jax does not import: {probe.stderr.strip()[-300:]}"
        write_report(report, args, info, install_note, stage_list, started, t0)
        raise SystemExit(f"jax does not import; wrote {report}")
    if info["backend"] != "gpu" and not args.allow_cpu:
        install_note += (
            f"; **no GPU backend** (jax.devices() = {info['devices']}): stopped. "
            "Install jax[cuda], or pass --allow-cpu."
        )
        write_report(report, args, info, install_note, stage_list, started, t0)
        raise SystemExit(
            f"No GPU backend: jax.devices() = {info['devices']}. Is jax[cuda] "
            f"installed? (--allow-cpu runs anyway.) Wrote {report}"
        )

    deadline = t0 + args.budget
    for stage in stage_list:
        left = deadline - time.perf_counter() - 5  # 5 s to write the report
        if left < 10:
            stage.status = "skipped (overall budget spent)"
        else:
            run_stage(stage, env, logdir, min(stage.limit, left))
        write_report(report, args, info, install_note, stage_list, started, t0)
    total = time.perf_counter() - t0
    print(f"\nwrote {report} ({total:.0f} s in all)")


if __name__ == "__main__":
    main()
