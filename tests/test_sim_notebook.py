"""The fleet-simulation notebook executes from top to bottom without an error (tiny sizes)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# A Jupyter kernel running the whole notebook: `make test-all`, not CI.
pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "fleet_simulation.ipynb"


def test_notebook_executes(monkeypatch):
    monkeypatch.setenv("SCORING_SIM_QUICK", "1")  # the kernel inherits it: CI-sized runs
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    tables = [
        output.text
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and "wait p95" in output.text
    ]
    assert len(tables) >= 2  # the policy comparison and the weight sweep
