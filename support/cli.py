"""The command-line style of the examples and benchmarks.

Every script takes `--grid` (grid points per side, or per dimension), `--methods` (a
comma-separated subset of the methods it compares) and `--out` (the folder it writes
tables and pictures to, `out/<script>` by default); every list is comma-separated
(`--methods kx.Exprb32,Tsit5`, `--rtols 1e-4,1e-8`).
"""

import argparse
from collections.abc import Callable, Sequence


def comma_list(item_type: Callable = str) -> Callable[[str], list]:
    """An argparse `type` for comma-separated lists: `"1e-4,1e-8"` → `[1e-4, 1e-8]`."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        try:
            return [item_type(item) for item in items]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    script: str,
    methods: Sequence[str],
    default_methods: Sequence[str] | None = None,
    grid: int | None,
    grid_help: str = "grid points per side",
) -> None:
    """Add `--grid`, `--methods` and `--out` to `parser`. `grid=None` means each
    problem's own size unless `--grid` is given."""
    parser.add_argument("--grid", type=int, default=grid, help=grid_help)
    parser.add_argument(
        "--methods",
        type=comma_list(),
        default=list(default_methods if default_methods is not None else methods),
        help="comma-separated subset of " + ",".join(methods),
    )
    parser.add_argument(
        "--out", default=f"out/{script}", help="folder for tables and pictures"
    )
    parser.add_argument(
        "--reuse-host-memory",
        action=_ReuseHostMemory,
        help="call krylovexp.reuse_host_memory() first (glibc keeps freed blocks up "
        "to 1 GiB for reuse; see docs/algorithm.md, 'Memory of XLA:CPU')",
    )


class _ReuseHostMemory(argparse.Action):
    """Applies `krylovexp.reuse_host_memory()` when the flag is parsed, before any
    computation, and records it for `support.measure.memory_environment`."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import krylovexp

        from . import measure

        if not krylovexp.reuse_host_memory():
            parser.error("--reuse-host-memory: glibc's mallopt is not available here")
        measure.HOST_MEMORY_REUSED = True
        setattr(namespace, self.dest, True)


def resolve_methods(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Match requested method names to the available ones, ignoring case and an
    optional `kx.` prefix (`exprb32` → `kx.Exprb32`); unknown names are an error that
    lists the choices."""

    def key(name: str) -> str:
        name = name.strip().lower()
        return name.removeprefix("kx.").removeprefix("krylovexp.")

    by_key = {key(name): name for name in available}
    resolved, unknown = [], []
    for name in requested:
        match = by_key.get(key(name))
        if match is None:
            unknown.append(name)
        elif match not in resolved:
            resolved.append(match)
    if unknown:
        raise SystemExit(
            f"unknown method(s) {', '.join(map(repr, unknown))}; choose from "
            + ", ".join(available)
        )
    return resolved
