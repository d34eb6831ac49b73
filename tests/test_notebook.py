"""notebooks/quickstart.ipynb runs top to bottom on CPU in tiny mode (nbclient)."""

from __future__ import annotations

import os
import pathlib
import shutil

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(tiny_pipeline: pathlib.Path, tmp_path, monkeypatch):
    # A copy of the tiny pipeline's workdir: the notebook's pipeline cell resumes it (every
    # stage but the report is skipped), then it plots, reads the report and samples.
    workdir = tmp_path / "quickstart"
    shutil.copytree(tiny_pipeline, workdir)
    monkeypatch.setenv("FLAXLM_NOTEBOOK_PRESET", "tiny")
    monkeypatch.setenv("FLAXLM_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    ]
    text = "".join(outputs)
    assert "flaxlm ready" in text
    assert "held-out oracle score: SFT" in text
    assert "ppo {" in text  # the policy's answers
    images = [
        out
        for cell in notebook.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, "the curves cell drew nothing"
