"""The notebook edition (notebooks.py): its cells from the fixture book, and every chapter
notebook of llm.org run top to bottom in a fresh kernel, as a reader would run it."""
import json
import time
from pathlib import Path

import nbformat
import pytest

import notebooks

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "weave" / "book.org"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def fixture_notebooks():
    import weave
    return notebooks.notebooks(FIXTURE, weave.prepare(FIXTURE))


def cells(files, name):
    nb = nbformat.reads(files[name].decode(), as_version=4)
    nbformat.validate(nb)
    return [(c.cell_type, c.source) for c in nb.cells]


def test_fixture_notebooks_cells(fixture_notebooks):
    files = fixture_notebooks
    assert sorted(files) == [notebooks.MARKER, "01-counting-things.ipynb",
                             "02-tables-and-figures.ipynb"]   # no code in the preface: none
    ch1 = cells(files, "01-counting-things.ipynb")
    assert ch1[0][0] == "code" and "sys.path.insert(0, str(ROOT / \"build\"))" in ch1[0][1]
    kinds = [k for k, _ in ch1[1:]]
    assert kinds == ["markdown", "code", "markdown"]
    prose, imports = ch1[1][1], ch1[2][1]
    assert prose.startswith("# Chapter 1 Counting things\n")
    # The package's blocks are shown with their labels, in reading order ...
    assert "*⟨count loop⟩*≡\n\n```python\nfor x in xs:\n    <<count-step>>\n```" in prose
    assert "*⟨count step⟩*+≡" in prose and "→ `build/fixture/count.py`" in prose
    assert prose.index("def count(") < prose.index("for x in xs:") < prose.index("total += x")
    # ... then imported from the tangled package, after the module's last block.
    assert imports == ("from fixture.count import *  # the blocks above, tangled into "
                       "build/fixture/count.py")
    # Math stays TeX for Jupyter; numbered equations keep their numbers.
    assert "$$S = \\sum_{i=1}^{n} x_i , \\tag{1.1}$$" in prose and "dividing (1.1) by $n$" in prose
    assert ch1[3][1].startswith("*⟨mean expr⟩*≡")
    assert "HIDDEN_CONSTANT" not in json.dumps(files["01-counting-things.ipynb"].decode())


def test_fixture_notebooks_repeat(fixture_notebooks):
    import weave
    assert notebooks.notebooks(FIXTURE, weave.prepare(FIXTURE)) == fixture_notebooks


def run_notebook(path: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


@pytest.fixture(scope="module")
def llm_notebooks(llm_book, tmp_path_factory):
    files = notebooks.notebooks(ROOT / "llm.org", llm_book())
    folder = tmp_path_factory.mktemp("notebooks")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.slow      # minutes: `make test-notebooks` (CI runs it after `make test`)
def test_every_chapter_notebook_runs(llm_notebooks, tmp_path, monkeypatch):
    """Each notebook, in a fresh kernel against the tangled build/: no cell fails, and the
    figures of the chapter come back as images."""
    monkeypatch.setenv("NOTEBOOK_FIGURES", str(tmp_path))
    names = sorted(p.name for p in llm_notebooks.glob("*.ipynb"))
    assert len(names) >= 17 and "06-attention.ipynb" in names
    times, images = {}, {}
    for name in names:
        start = time.perf_counter()
        nb = run_notebook(llm_notebooks / name)        # raises CellExecutionError on a failure
        times[name] = round(time.perf_counter() - start, 1)
        images[name] = sum("image/png" in o.get("data", {})
                           for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    ARTIFACTS.mkdir(exist_ok=True)
    import os
    (ARTIFACTS / "notebook-times.json").write_text(json.dumps(
        {"seconds": times, "total": round(sum(times.values()), 1), "images": images,
         "load": os.getloadavg()}, indent=1) + "\n")
    # The attention chapter draws its figures when run (some live, some as recorded).
    assert images["06-attention.ipynb"] >= 4
    assert sum(images.values()) >= 15
