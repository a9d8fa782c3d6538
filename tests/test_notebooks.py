"""The notebooks run top to bottom on the embedded default (stored without outputs)."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "custom_dataset.ipynb", "publish.ipynb",
                                         "retrieval.ipynb"}
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        assert all(not c.get("outputs") and not c.get("execution_count") for c in cells if c.cell_type == "code")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    shutil.copy(path, tmp_path / path.name)
    notebook = nbformat.read(tmp_path / path.name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    if path.stem == "custom_dataset":
        assert "missing.png" in text and "all rows usable: False" in text
    if path.stem == "quickstart":
        assert "held-out vqa_accuracy: before" in text
    if path.stem == "retrieval":
        assert "held-out mean_recall: before" in text and "zero-shot top-1: base" in text and "CLIPModel" in str(
            notebook.cells[-1].outputs)
