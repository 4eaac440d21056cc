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
from hypothesis import HealthCheck, settings  # noqa: E402


# Double precision, as the references need, unless KRYLOVEXP_TEST_X64=0: then JAX's
# default single precision, as a user who never enables x64 gets it (test_float32.py
# is written for that run; test_float32_run.py starts it in a subprocess).
X64 = os.environ.get("KRYLOVEXP_TEST_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)


# Property-based tests (tests/test_properties.py). The default profile, "ci", keeps
# them to a few examples each (their cost is mostly compilation, one per dtype and
# configuration). `HYPOTHESIS_PROFILE=thorough python -m pytest
# tests/test_properties.py` runs hundreds of generated cases per property (about an
# hour on two cores) and widens the configurations drawn (see
# `test_properties.CONFIGS`).
_HYPOTHESIS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=8, derandomize=True, **_HYPOTHESIS)
settings.register_profile("thorough", max_examples=600, **_HYPOTHESIS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
