import functools
import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Parity numbers are measured single-threaded, like the golden oracle; it also keeps the
# 2-core CI machine responsive while the Cog server tests run subprocesses.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mla_pipeline():
    from deepseek_vl2_runtime import Pipeline

    from checkpoints import MLA_MODEL

    return Pipeline.load(MLA_MODEL, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def predictor():
    """The Cog Predictor, set up in-process on the tiny checkpoint."""
    from predict import Predictor

    from paths import tiny_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPSEEK_VL2_WEIGHTS", str(tiny_checkpoint()))
        p = Predictor()
        p.setup()
    return p


# -- tiers: `make test-fast` deselects server, subprocess, fuzz and slow tests -------------------
# Modules mark their own tests (pytestmark or a decorator). These rules also mark the tests of
# modules that do not, from what a test does: its own source, a function of its module that it
# calls, or a fixture it uses
#   server      starts a CogServer (tests/cog_server.py)
#   subprocess  spawns a process (subprocess.run / Popen / call / check_*)
#   slow        the soak, and the tests listed in SLOW_TESTS
SLOW_MODULES = {"test_soak.py"}
# Each over 2.5 s on the 2-core CI machine (their owners may mark them in place instead); the
# other parametrizations of the same tests stay in the fast tier.
SLOW_TESTS = {
    "tests/test_engine.py::test_seeded_sampled_requests_equal_alone[realtok]",
    "tests/test_engine.py::test_every_golden_input_batched_equals_alone[realtok]",
    "tests/test_engine.py::test_mixes_of_sizes_with_staggered_joins[realtok-16]",
    "tests/test_bench.py::test_smoke_run_on_the_tiny_checkpoint",
    "tests/test_bench.py::test_random_run_in_process",
}
# `make test` runs the modules on every core (pytest-xdist, one module per worker at a time:
# --dist loadfile keeps each module's Cog server to one boot). Workers take modules in collection
# order, so the longest go first (serial seconds on the 2-core machine), where they overlap
# the rest instead of starting last and running alone.
LONGEST_FIRST = (
    "test_reliability.py",  # ~70 s
    "test_real_width.py",  # ~50 s
    "test_cache.py",  # ~45 s with a cold inductor cache (the compiled decode step)
    "test_engine.py",  # ~40 s
    "test_soak.py",  # ~37 s
    "test_cog_server.py",  # ~32 s
)
_SPAWNS = re.compile(r"\bsubprocess\.(run|Popen|call|check_call|check_output)\(")


@functools.cache
def _source(func) -> str:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return ""


def _sources(item: pytest.Item) -> list[str]:
    """The test's source, the module functions it calls by name, and its fixtures' sources."""
    test = getattr(item, "function", None)
    if test is None:
        return []
    module = inspect.getmodule(test)
    helpers = [getattr(module, name, None) for name in test.__code__.co_names]
    helpers = [f for f in helpers if inspect.isfunction(f) and inspect.getmodule(f) is module]
    info = getattr(item, "_fixtureinfo", None)
    fixtures = [d.func for defs in getattr(info, "name2fixturedefs", {}).values() for d in defs]
    return [_source(f) for f in [test, *helpers, *fixtures]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        sources = _sources(item)
        if any("CogServer(" in source for source in sources):
            item.add_marker(pytest.mark.server)
        if any(_SPAWNS.search(source) for source in sources):
            item.add_marker(pytest.mark.subprocess)
        if item.path.name in SLOW_MODULES or item.nodeid in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: modules stay whole
