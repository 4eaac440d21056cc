"""Relative errors, tolerances for tests, wall-clock timing and compiled memory."""

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(value: Any, reference: Any) -> float:
    """Relative 2-norm error `‖value − reference‖ / ‖reference‖` over all leaves of two
    pytrees of the same structure (arrays included); the absolute error where the
    reference is zero."""
    values = [np.ravel(np.asarray(x)) for x in jax.tree.leaves(value)]
    references = [np.ravel(np.asarray(x)) for x in jax.tree.leaves(reference)]
    if len(values) != len(references):
        raise ValueError("`value` and `reference` must have the same pytree structure.")
    pairs = zip(values, references, strict=True)
    difference = np.concatenate([a - b for a, b in pairs])
    scale = np.linalg.norm(np.concatenate(references))
    return float(np.linalg.norm(difference) / (scale if scale > 0 else 1.0))


def tol(dtype) -> float:
    """The accuracy a test may ask of a solve in `dtype` at default tolerances."""
    return 1e-8 if jnp.finfo(dtype).bits == 64 else 2e-4


def timed(
    fn: Callable, *args: Any, repeats: int = 5, warm_up: bool = True
) -> tuple[Any, float]:
    """Median wall time of `repeats` calls `fn(*args)`, each ended by
    `jax.block_until_ready`, after one warm-up call (compilation, first-touch memory)
    unless `warm_up=False`.

    **Returns:** `(output of the last call, median seconds)`.
    """
    if warm_up:
        jax.block_until_ready(fn(*args))
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def compiled_memory_mb(compiled) -> float | None:
    """XLA's buffer assignment for an AOT-compiled function: arguments + outputs +
    temporaries − aliased buffers, in MiB. A static estimate of the peak, not measured
    resident memory; `None` where the backend does not report it."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


# Set by the `--reuse-host-memory` flag of `support.cli.add_common_arguments`.
HOST_MEMORY_REUSED = False


def memory_environment() -> str:
    """The settings that change XLA:CPU's cost of memory, for a benchmark's header:
    glibc's `MALLOC_*` thresholds and `XLA_FLAGS` as set, whether
    `krylovexp.reuse_host_memory()` was applied, with a warning when the
    `mmap` threshold is set alone (that disables glibc's dynamic trim threshold, so
    every call faults its temporaries in again: see docs/algorithm.md)."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "XLA_FLAGS")
    settings = [f"{name}={os.environ[name]}" for name in names if name in os.environ]
    if HOST_MEMORY_REUSED:
        settings.append("krylovexp.reuse_host_memory() (glibc thresholds 1 GiB)")
    text = ", ".join(settings) or "glibc and XLA defaults"
    if "MALLOC_MMAP_THRESHOLD_" in os.environ and (
        "MALLOC_TRIM_THRESHOLD_" not in os.environ
    ):
        text += " (WARNING: MALLOC_MMAP_THRESHOLD_ without MALLOC_TRIM_THRESHOLD_)"
    return text
