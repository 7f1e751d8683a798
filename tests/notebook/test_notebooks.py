"""The example notebooks, executed top to bottom with nbclient, each on its own database."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_harness import ROOT
from nbclient import NotebookClient

pytestmark = pytest.mark.kernel

NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01-quickstart.ipynb", "02-unblock-and-logs.ipynb", "03-failures-retry-resume.ipynb"]
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"


def execute(name: str, dsn: str, workdir: Path) -> Any:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        store_widget_state=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=dict(os.environ, PGSKEWER_DSN=dsn))
    return notebook


def outputs(notebook: Any) -> list[Any]:
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stripped(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert outputs(notebook) == []
    assert all(cell.get("execution_count") is None for cell in notebook.cells)
    assert "widgets" not in notebook.metadata


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, dsn: str, tmp_path: Path) -> None:
    notebook = execute(name, dsn, tmp_path)

    assert [o for o in outputs(notebook) if o.output_type == "error"] == []
    state = notebook.metadata["widgets"][WIDGET_STATE_MIME]["state"]
    html_values = [
        model["state"].get("value", "")
        for model in state.values()
        if model["model_name"] == "HTMLModel"
    ]
    assert any("pgs-st-successful" in value for value in html_values)
    assert not any("pgs-st-running" in value for value in html_values if "pgs-title" in value)


def test_nbconvert_without_widget_state_shows_final_table(dsn: str, tmp_path: Path) -> None:
    from nbconvert import HTMLExporter

    notebook = execute("01-quickstart.ipynb", dsn, tmp_path)
    run_cell = next(cell for cell in notebook.cells if cell.source.startswith("run = "))
    (bundle,) = [o.data for o in run_cell.outputs if o.output_type == "display_data"]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert 'class="pgskewer-run pgs-st-successful"' in bundle["text/html"]

    stripped = copy.deepcopy(notebook)
    del stripped.metadata["widgets"]
    body, _ = HTMLExporter().from_notebook_node(stripped)

    tables = re.findall(r'<div class="pgskewer-run pgs-st-(\w+)"', body)
    assert tables, "no step table in the HTML export"
    assert set(tables) == {"successful"}
    statuses = re.findall(r'data-path="([^"]*)".*?pgs-st-(\w+)', body)
    assert ("2.0", "successful") in statuses
    assert ("2.1", "successful") in statuses
    assert "application/vnd.jupyter.widget-view+json" not in body
