import gc
import os


# The suite is dominated by XLA compilation of small problems: skip the expensive
# LLVM optimisation passes (about 40% less compile time; the numbers are unchanged).
# Benchmarks and examples run with the defaults.
TEST_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TEST_FLAGS])

import jax  # noqa: E402
import pytest  # noqa: E402


# Double precision, as the references need, unless KRYLOVEXP_TEST_X64=0: then JAX's
# default single precision, as a user who never enables x64 gets it (test_float32.py
# is written for that run; test_float32_run.py starts it in a subprocess).
X64 = os.environ.get("KRYLOVEXP_TEST_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)


# Every XLA:CPU executable keeps its compiled kernels in memory mappings of its own, and
# JAX's caches keep the executables alive. The suite compiles thousands of programs; a
# Linux process may hold at most `vm.max_map_count` (65,530 by default) mappings, and
# past that LLVM segfaults while compiling the next program. Drop the caches (and with
# them the code) whenever the count gets high.
_MAX_MAPPINGS = 30_000


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_code():
    yield
    if _memory_mappings() > _MAX_MAPPINGS:
        jax.clear_caches()
        gc.collect()
