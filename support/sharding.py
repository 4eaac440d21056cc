"""Simulated devices and the collectives of a compiled program, for the sharding test
(`tests/sharded_check.py`) and the sharded example (`examples/sharded_heat.py`).

- `host_devices(count)`: ask XLA for `count` CPU devices. The flag is read once, when
  JAX starts its CPU backend, so call this before the first JAX computation (in
  practice: before importing jax, in a fresh process).
- `collectives(hlo_text)`: the collective operations in a compiled program
  (`jax.jit(f).lower(...).compile().as_text()`), with their shapes and the
  computation (loop body, branch, `ENTRY ...`) each sits in.
- `step_collectives(hlo_text)`: those in the loop bodies that exchange halos: the
  collectives of one Krylov step.
"""

import math
import os
import re
from typing import NamedTuple


_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def host_devices(count: int, cpu_only: bool = True) -> None:
    """Add `--xla_force_host_platform_device_count=count` to `XLA_FLAGS` (unless a
    device count is already set there), and with `cpu_only` make JAX use the CPU
    (else an accelerator, where there is one, stays JAX's default; the flag only
    concerns the CPU). No effect once JAX has started its backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={count}".strip()
    if cpu_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


class Collective(NamedTuple):
    op: str  # all-gather, all-reduce, collective-permute, all-to-all, reduce-scatter
    dtype: str
    shape: tuple[int, ...]
    computation: str  # the HLO computation it sits in

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"{self.op} {self.dtype}{list(self.shape)}"


_OPS = "all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter"
# `%name = f64[8,1,32]{2,1,0} all-gather(...)`, or the `-start` of an asynchronous
# one (whose result is a tuple; its last shape is the output).
_LINE = re.compile(rf"=\s+(.+?)\s+({_OPS})(?:-start)?\(")
_SHAPE = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$")


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective operation in the text of a compiled HLO module."""
    found, computation = [], "?"
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            if line.startswith("ENTRY"):
                computation = "ENTRY " + computation
            continue
        match = _LINE.search(line)
        if not match:
            continue
        shapes = _SHAPE.findall(match.group(1))
        if not shapes:
            continue
        dtype, dims = shapes[-1]
        shape = tuple(int(d) for d in dims.split(",") if d)
        found.append(Collective(match.group(2), dtype, shape, computation))
    return found


def step_collectives(hlo_text: str) -> dict[str, list[Collective]]:
    """The collectives of each computation other than the entry (a loop body, a
    branch) that holds a halo exchange (`collective-permute`): per Krylov step, the
    operator's halo exchange and the reductions of the orthogonalisation."""
    by_computation: dict[str, list[Collective]] = {}
    for c in collectives(hlo_text):
        by_computation.setdefault(c.computation, []).append(c)
    return {
        name: ops
        for name, ops in by_computation.items()
        if not name.startswith("ENTRY")
        and any(c.op == "collective-permute" for c in ops)
    }
