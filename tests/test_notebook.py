"""The walkthrough notebook runs from top to bottom."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "mode_multitask_walkthrough.ipynb"
SNI_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural-instructions-subset"


@pytest.mark.slow
def test_walkthrough_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("SNI_DIR", str(SNI_SUBSET))
    notebook = nbformat.read(NOTEBOOK, as_version=4)

    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    assert "reloaded adapter gives identical logits: True" in outputs
    assert (tmp_path / "notebook-run" / "router_heatmap_average.png").exists()
