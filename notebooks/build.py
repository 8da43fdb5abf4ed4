"""Build the notebooks from their percent-format sources and execute them in place.

    python notebooks/build.py            # every notebook
    python notebooks/build.py 03         # those whose name contains "03"

Each ``src/NAME.py`` holds cells separated by ``# %%`` (code) and ``# %% [markdown]``
(markdown, every line commented with ``# ``). The executed notebook, outputs included,
is written to ``NAME.ipynb`` so it reads well on a code host without running.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 600


def parse_cells(source: str) -> list:
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#")
                for line in text.splitlines()
            )
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text.strip():
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def _render_carriage_returns(text: str) -> str:
    """What a terminal shows: on each line only the text after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def coalesce_streams(nb) -> None:
    """Merge consecutive stdout / stderr chunks (e.g. a progress bar's updates) in place."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            prev = merged[-1] if merged else None
            if (out.output_type == "stream" and prev is not None
                    and prev.output_type == "stream" and prev.name == out.name):
                prev.text += out.text
            else:
                merged.append(out)
        for out in merged:
            if out.output_type == "stream":
                out.text = _render_carriage_returns(out.text)
        cell.outputs = merged


def build(src: Path, execute: bool = True) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells = parse_cells(src.read_text())
    if execute:
        NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE)}}).execute()
        coalesce_streams(nb)
    out = HERE / f"{src.stem}.ipynb"
    tmp = out.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(out)
    return out


def main(argv: list[str]) -> None:
    pattern = argv[0] if argv else ""
    for src in sorted((HERE / "src").glob("*.py")):
        if pattern in src.stem:
            print(f"building {src.name} ...", flush=True)
            print(f"  wrote {build(src).relative_to(HERE.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:])
