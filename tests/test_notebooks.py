"""Every notebook runs top to bottom, and the committed .ipynb matches its source."""

import importlib.util
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the dev extra")
from nbclient import NotebookClient  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted((NOTEBOOKS / "src").glob("*.py"))
BUDGET_S = 180  # each notebook must run in under 3 minutes on a 2-core CPU


def _builder():
    spec = importlib.util.spec_from_file_location("nb_build", NOTEBOOKS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_notebooks():
    assert len(SOURCES) >= 1


@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_committed_notebook_matches_its_source_and_has_outputs(src):
    built = _builder().parse_cells(src.read_text())
    committed = nbformat.read(NOTEBOOKS / f"{src.stem}.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in built
    ], f"{src.stem}.ipynb is stale: run python notebooks/build.py {src.stem}"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "saved without outputs"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.slow
@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_executes_without_error_within_budget(src):
    nb = nbformat.v4.new_notebook()
    nb.cells = _builder().parse_cells(src.read_text())
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=BUDGET_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    assert elapsed < BUDGET_S, f"{src.stem} took {elapsed:.0f} s"
