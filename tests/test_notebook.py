"""The learners' notebook runs, top to bottom, on the tiny run: it cannot rot unnoticed. Its own asserts check
the by-hand attention against the layer's output and the per-head maps against their mean."""


import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat", reason='the notebook test needs nbclient and ipykernel: pip install -e ".[dev]"')
nbclient = pytest.importorskip("nbclient", reason='the notebook test needs nbclient and ipykernel: pip install -e ".[dev]"')


def test_the_notebook_runs_on_the_tiny_model(finished_run, monkeypatch):
    notebook = nbformat.read(ROOT / "notebooks" / "cross_attention.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not any(cell.outputs or cell.execution_count for cell in code)  # kept in git with its outputs cleared
    monkeypatch.setenv("NOTEBOOK_MODEL", str(finished_run))
    monkeypatch.setenv("NOTEBOOK_STEPS", "4")
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "by hand = the module's output" in text and "alignment: ['a <- a', 'red <- red', 'star <- circle'" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 5  # one picture per section 3-7
