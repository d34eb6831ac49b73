"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")


import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> pathlib.Path:
    """One finished `flaxlm pipeline` run of configs/pipeline.py:tiny, shared by the tests
    of the pipeline, the README and the notebook (copy it before changing it)."""
    from train import pipeline

    root = pathlib.Path(__file__).resolve().parents[1]
    workdir = tmp_path_factory.mktemp("tiny_pipeline") / "run"
    config = f"{root / 'configs' / 'pipeline.py'}:tiny"
    assert pipeline.main(["--config", config, "--workdir", str(workdir)]) == 0
    return workdir
