"""Test setup: 8 fake CPU devices, set before jax is imported anywhere, and a persistent
compilation cache private to this pytest session, shared with the subprocesses tests start.
`require` / `missing`: an optional test input (the [hf] extra, a browser, a model file)
that is absent skips its tests, except under CI, where it fails them."""

import fcntl
import json
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs, often in fresh processes (CLI runs, resumes):
# a cache keyed by the program and devices saves their recompilation (measured: the
# tiny pretraining run's user time 21 s -> 8.4 s on a second launch, the first of which
# also prepared its data). A new directory per session, removed at its end, so no program
# compiled by older code is ever reused.
_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="flaxlm-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import importlib  # noqa: E402
import pathlib  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import pytest  # noqa: E402

HF_EXTRA = "pip install -e '.[hf]'"


def on_ci() -> bool:
    """CI is set (CI=true, as CI services and .ci/run's callers set it): every extra the
    README's test command installs must be there, so nothing may skip for want of it."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, hint: str) -> NoReturn:
    """An optional test input is absent: skip, or under CI fail naming it."""
    message = f"{what} is missing ({hint})"
    if on_ci():
        pytest.fail(f"CI={os.environ['CI']}: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(module: str, hint: str = HF_EXTRA) -> types.ModuleType:
    """Import an optional dependency for a test (in a test, a fixture or at module level):
    skip when it is not installed, fail under CI."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing(f"module {module!r} ({err})", hint)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _CACHE_DIR is not None:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def built_once(
    factory: pytest.TempPathFactory, name: str, build: Callable[[pathlib.Path], Any]
) -> Any:
    """`build(empty dir)` once per pytest run, its JSON result shared by every worker.

    Under pytest-xdist (the README's `-n 2`) each worker has its own session fixtures;
    the first to need this one builds it holding a lock in the run's common temp dir,
    the others wait and read its result (no second build competing for the 2 cores).
    """
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, shared by this run's popen-gw* dirs
    result = base / f"{name}.json"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            value = build(pathlib.Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base)))
            result.write_text(json.dumps(value))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> pathlib.Path:
    """One finished `flaxlm pipeline` run of configs/pipeline.py:tiny, shared by the tests
    of the pipeline, the README and the notebook (copy it before changing it)."""
    from orchestrate import pipeline

    config = f"{pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'pipeline.py'}:tiny"

    def build(root: pathlib.Path) -> str:
        workdir = root / "run"
        assert pipeline.main(["--config", config, "--workdir", str(workdir)]) == 0
        return str(workdir)

    return pathlib.Path(built_once(tmp_path_factory, "tiny_pipeline", build))


@pytest.fixture(scope="session")
def rl_chain(tmp_path_factory) -> dict:
    """Tiny pretrain → SFT → reward runs (tests/rl_chain.py), shared by the RL tests."""
    from tests.rl_chain import make_chain

    def build(root: pathlib.Path) -> dict:
        chain = make_chain(root)
        return {k: v if k == "paths" else str(v) for k, v in chain.items()}

    chain = built_once(tmp_path_factory, "rl_chain", build)
    return {k: v if k == "paths" else pathlib.Path(v) for k, v in chain.items()}
