"""notebooks.py: a Jupyter notebook per chapter. `python notebooks.py [llm.org] [-o notebooks]`.

The same reading of llm.org as the PDF and the web edition (weave.prepare(), then the web
edition's rewriter with Markdown in place of HTML), cut into cells in reading order:

  prose                 Markdown cells (math as $...$, numbered equations with \\tag)
  package code          shown as Markdown (its label line and the code): the blocks are
                        fragments (<<chunk>> references, methods of a class), so they are not
                        run one by one; after the last block of a module in the chapter a
                        code cell imports it from the tangled package (`make tangle`)
  result blocks         code cells that run, then show their value and figure
  frozen results        (`:cache yes`: they need the trained model runs/shakespeare or minutes
                        of computing) shown as code, with a cell that displays the value and
                        figure the book recorded under pdf/results/; results.py recomputes them
  result blocks the book hides (`:exports none`) that draw a figure: a code cell after the
                        figure, so a run redraws it

Every notebook runs top to bottom in a fresh kernel from a clone that ran `make tangle`:
the first cell finds the project root, goes there and puts build/ on the path.
nbformat writes the files (ids of cells numbered, so the same input gives the same bytes);
tests/test_notebooks.py runs each with nbclient.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import literate
import weave
import web
from weave import Piece, el

MARKER = ".weave-notebooks"
CELL = "<!--WEAVE-CELL:{}-->"
CELL_RE = re.compile(r"<!--WEAVE-CELL:(\d+)-->")
RESULTS = "pdf/results"

SETUP = '''\
# Setup: run from the project root, with the package tangled from llm.org (`make tangle`).
import json, os, sys, tempfile
from pathlib import Path
from IPython.display import Image, display

ROOT = Path.cwd().resolve()
while not (ROOT / "{org}").is_file() and ROOT != ROOT.parent:
    ROOT = ROOT.parent
if not (ROOT / "build").is_dir():
    raise RuntimeError("build/ is missing: run `make tangle` in the project root first")
os.chdir(ROOT)                      # the result blocks read and write relative to it
sys.path.insert(0, str(ROOT / "build"))
os.environ.setdefault("MPLBACKEND", "Agg")
FIGURES = Path(os.environ.get("NOTEBOOK_FIGURES") or tempfile.mkdtemp(prefix="llm-figures-"))
FIGURES.mkdir(parents=True, exist_ok=True)


def show_result(result=None, figure=None):
    """What the book shows of a result block: its value, then its figure."""
    if result is not None:
        display(result)
    if figure is not None and Path(figure).is_file():
        display(Image(filename=str(figure)))


def show_recorded(name):
    """A frozen result as the book recorded it: {results}/NAME.json and NAME.png."""
    record = json.loads((ROOT / "{results}" / f"{{name}}.json").read_text())
    show_result(record["value"], ROOT / "{results}" / f"{{name}}.png")
'''


class NotebookRewriter(web.WebRewriter):
    """The web edition's pass, writing Markdown for Jupyter and marking where code cells go."""

    def __init__(self, book, ast, res=None):
        super().__init__(book, ast, res)
        self.cells: list[tuple[str, object]] = []      # (kind, Piece or result name)

    def cell(self, kind: str, what) -> dict:
        self.cells.append((kind, what))
        return web.raw_block(CELL.format(len(self.cells) - 1))

    def chunk_block(self, p: Piece) -> list:
        self.where[p.id] = self.section
        return [self.cell("block", p)]

    def chunk_link(self, name: str, p: Piece) -> list:
        return [el("Emph", [el("Str", f"⟨{weave.display_name(name)}⟩")])]

    def heading(self, line: int, level: int, attr: list, inlines: list) -> list:
        out = super().heading(line, level, attr, inlines)
        header = out[-1]["c"]         # Markdown: the number as text, no id or classes
        header[1] = ["", [], []]
        header[2] = [y for x in header[2] for y in
                     (x["c"][1] if x.get("t") == "Span" else [x])]
        return out

    def figure(self, x: dict) -> dict:
        x = super().figure(x)
        x["c"][0] = ["", [], []]      # no {#id}: nothing in a notebook links to it
        return x

    def table(self, x: dict) -> dict:
        x = super().table(x)
        x["c"][0] = ["", [], []]
        return x

    def numbered_equation(self, math: dict, label: str | None) -> list:
        number = self.equation_number(label)
        return [el("Math", [math["c"][0], math["c"][1] + f" \\tag{{{number}}}"])]

    def equation_ref(self, kind: str, label: str) -> list:
        return [el("Str", self.equation_ref_text(kind, label))]

    def float_ref(self, target: str) -> list:
        return [el("Str", web.hole("num", target))]

    def image_url(self, rel: str) -> str:
        return "../" + rel            # the notebooks live in notebooks/

    def block(self, x: dict) -> list:
        out = super().block(x)
        if x["t"] == "Figure":      # a figure drawn by a result block the book does not show
            for url in re.findall(rf'"{RESULTS}/([\w.-]+)\.png"', json.dumps(x)):
                spec = self.results.specs.get(url)
                pieces = [p for p in self.book.pieces if p.block is getattr(spec, "block", None)]
                if spec and pieces and not pieces[0].visible:
                    out.append(self.cell("hidden-result", url))
        return out

    def inline(self, x: dict) -> list:
        out = super().inline(x)
        # Links inside the book (#id) have no target in a notebook: their text stays.
        flat = []
        for y in out:
            if y.get("t") == "Link" and y["c"][2][0].startswith("#"):
                flat += y["c"][1]
            else:
                flat.append(y)
        return flat


def fence(code: str, lang: str) -> str:
    ticks = "```"
    while ticks in code:
        ticks += "`"
    return f"{ticks}{lang}\n{code}\n{ticks}"


def label_line(book: weave.Book, p: Piece) -> str:
    """⟨name⟩≡ → file, as the book prints it above a block."""
    head = []
    if p.chunk:
        plus = book.chunks[p.chunk][0] is not p
        head.append(f"*⟨{weave.display_name(p.chunk)}⟩*{'+≡' if plus else '≡'}")
    if p.target:
        head.append(f"→ `{p.target}`")
    return " ".join(head)


def module_of(target: str | None) -> str | None:
    """build/llm/model.py -> llm.model (None for what is not an importable module)."""
    if not target or not target.startswith("build/") or not target.endswith(".py"):
        return None
    parts = Path(target[len("build/"):]).with_suffix("").parts
    if parts[-1] in ("__main__", "__init__"):
        return None
    return ".".join(parts)


def result_cell(spec, name: str) -> list:
    """The cells of one result block: run it, or show what was recorded if it is frozen."""
    import nbformat.v4 as nbf
    code = "\n".join(spec.block.body)
    if spec.frozen:
        inputs = " ".join(spec.inputs)
        why = (f" It reads {', '.join(f'`{i}`' for i in spec.inputs if not i.startswith('build/'))}."
               if any(not i.startswith("build/") for i in spec.inputs) else "")
        note = (f"The result `{name}` is frozen: the book runs it once, with "
                f"`python results.py llm.org {name}`, and keeps its value and figure under "
                f"`{RESULTS}/`.{why} Its code:\n\n" + fence(code, "python") +
                "\n\nThe recorded result (run the code above in this notebook to recompute it):")
        return [nbf.new_markdown_cell(note),
                nbf.new_code_cell(f'show_recorded("{name}")')]
    tail = ("show_result(figure=figure_path)" if spec.output
            else "show_result(result, figure_path)")
    return [nbf.new_code_cell(f'result, figure_path = None, FIGURES / "{name}.png"\n'
                              f"{code}\n{tail}")]


def chapter_cells(rw: NotebookRewriter, markdown: str, org: str) -> list:
    """The cells of one chapter, from its Markdown with cell markers."""
    import nbformat.v4 as nbf
    book, specs = rw.book, rw.results.specs
    pieces = re.split(CELL_RE, markdown)
    kinds = [rw.cells[int(k)] for k in pieces[1::2]]
    # After the chapter's last block of each module, a cell imports the module.
    last = {}
    for k, (kind, p) in enumerate(kinds):
        if kind == "block" and (m := module_of(p.target)):
            last[m] = k
    out = [nbf.new_code_cell(SETUP.format(org=org, results=RESULTS))]
    text = ""

    def prose(s):
        nonlocal text
        text += s

    def flush():
        nonlocal text
        if text.strip():          # (a cell may open with an indented block: keep its spaces)
            text = re.sub(r"\n{3,}", "\n\n", re.sub(r"^(?:[ \t]*\n)+", "", text).rstrip())
            out.append(nbf.new_markdown_cell(text))
        text = ""

    prose(pieces[0])
    for k, (kind, what) in enumerate(kinds):
        if kind == "hidden-result":
            flush()
            out += result_cell(specs[what], what)
        else:
            p = what
            name = p.block.name
            if name in specs:
                flush()
                out += result_cell(specs[name], name)
            else:
                head = label_line(book, p)
                prose(("\n\n" + head + "\n\n" if head else "\n\n")
                      + fence("\n".join(p.block.body), p.block.lang) + "\n\n")
                modules = [m for m, j in last.items() if j == k]
                if modules:
                    flush()
                    out.append(nbf.new_code_cell("\n".join(
                        f"from {m} import *  # the blocks above, tangled into build/"
                        f"{m.replace('.', '/')}.py" for m in modules)))
        prose(pieces[2 * k + 2])
    flush()
    return out


def notebooks(org: Path, prepared: tuple | None = None) -> dict[str, bytes]:
    """Every notebook: file name -> bytes. Chapters without code get none."""
    import nbformat
    import nbformat.v4 as nbf
    book, ast, res = prepared or weave.prepare(org)
    rw = NotebookRewriter(book, ast, res)
    ast = dict(ast, blocks=rw.run())
    for w in rw.warnings:
        print(f"warning: {w}", file=sys.stderr)
    # Markdown as Jupyter reads it: $math$, pipe tables, HTML where Markdown has no syntax.
    to = "markdown_strict+tex_math_dollars+pipe_tables+backtick_code_blocks+footnotes+raw_html"
    text, _ = weave.pandoc(book.doc, ["--from=json", f"--to={to}", "--citeproc",
                                      "--wrap=none", "--reference-location=block"],
                           json.dumps(ast))
    parts = web.PAGE_RE.split(text)
    files = {}
    for k in range(1, len(parts), 2):
        page = rw.pages[int(parts[k])]
        body = web.HOLE.sub(lambda m: rw.numbers.get(m.group(2), "?") if m.group(1) == "num"
                            else rw.where.get(m.group(2), "?"), parts[k + 1])
        if page.level != 2 or not CELL_RE.search(body):
            continue
        cells = chapter_cells(rw, body, org.name)
        if not any(c.cell_type == "code" for c in cells[1:]):
            continue
        nb = nbf.new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})
        for j, c in enumerate(nb.cells):
            c.id = f"c{j:03d}"          # fixed ids: the same book gives the same bytes
        nbformat.validate(nb)
        files[Path(page.file).with_suffix(".ipynb").name] = nbformat.writes(nb).encode("utf-8")
    files[MARKER] = b"written by notebooks.py from " + org.name.encode() + b"; replaced whole by it\n"
    return files


def main(argv: list[str] | None = None) -> int:
    return literate.generated_folder_main(
        argv, "notebooks.py", "A Jupyter notebook per chapter of llm.org, into notebooks/ "
        "(run them after `make tangle`).", "notebooks", notebooks, MARKER, ".ipynb", "notebooks")


if __name__ == "__main__":
    sys.exit(main())
