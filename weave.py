"""weave.py: the book. `python tangle.py weave llm.org` -> pdf/llm.pdf.

The route has three steps, each a section below:
  1. model    the core's reading of llm.org (literate.py, as tangle uses it): every source
              block with its resolved header arguments, the chunk it adds to, the file
              it goes to, who uses it
  2. rewrite  pandoc reads llm.org into its JSON AST; a pass over that AST puts the
              model's labels on the code blocks and repairs what pandoc's Org reader
              leaves raw (equation environments, [[*Heading]] and [[name]] links)
  3. typeset  pandoc writes Typst; pdf/book.typ (the typography) goes in front; the
              `typst` package compiles it in-process into a byte-reproducible PDF

Tangling never reads pandoc's AST (the Org reader drops `:exports none` blocks and
knows nothing of inherited header arguments); the weave reads both, and takes every
fact about code (names, targets, continuations) from literate.py, the core below it.
"""
from __future__ import annotations

import ast as pyast        # Python's syntax trees (`ast` here is pandoc's)
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import results
import literate
import tested_by
from literate import TangleError

TEMPLATE = Path(__file__).resolve().parent / "pdf" / "book.typ"
FONTS = TEMPLATE.parent / "fonts"       # CJK and emoji glyphs the wheel's fonts lack
MARK = "/* {name}:{line} */"          # comments in the Typst source that name an Org line
MARK_RE = re.compile(r"/\* [^:*]+:(\d+) \*/")


# ---------------------------------------------------------------------------
# 1. The model: what the core (literate.py) knows about every block
# ---------------------------------------------------------------------------

@dataclass
class Piece:
    """One source block as the book shows it."""
    block: literate.Block
    id: str                               # its Typst label, blk-LINE
    chunk: str | None                     # the #+name or :noweb-ref it defines
    target: str | None                    # the file it is tangled to
    refs: list[str]                       # the chunks its body uses (<<name>>)
    visible: bool = True                  # pandoc kept it (not :exports none)


@dataclass
class Book:
    doc: literate.Document
    pieces: list[Piece]                   # every live block, in document order
    chunks: dict[str, list[Piece]]        # chunk name -> its blocks, in document order
    files: dict[str, list[Piece]]         # target -> its blocks, in document order
    users: dict[str, list[Piece]] = field(default_factory=dict)  # chunk -> blocks using it
    identifiers: list[Identifier] = field(default_factory=list)  # top-level names of the code
    tested: tested_by.Record | None = None     # which tests run which block (pdf/tested-by.json)
    listing: bool = False                 # the book places the test listing (#tested-by-listing())

    def shown(self, pieces: list[Piece]) -> list[Piece]:
        return [p for p in pieces if p.visible]

    def sequence(self, p: Piece) -> list[Piece]:
        """The blocks p is continued by: its chunk's if that has several, else its file's."""
        if p.chunk and len(self.chunks[p.chunk]) > 1:
            return self.chunks[p.chunk]
        if p.target and len(self.files[p.target]) > 1:
            return self.files[p.target]
        return [p]

    def neighbours(self, p: Piece) -> tuple[Piece | None, Piece | None]:
        """The previous and next shown block of p's chunk or file."""
        seq = self.shown(self.sequence(p))
        if p not in seq:
            return None, None
        k = seq.index(p)
        return (seq[k - 1] if k > 0 else None), (seq[k + 1] if k + 1 < len(seq) else None)

    def first_definition(self, name: str) -> Piece | None:
        shown = self.shown(self.chunks.get(name, []))
        return shown[0] if shown else None

    def used_in(self, p: Piece) -> list[Piece]:
        return self.users.get(p.chunk, []) if p.chunk else []


def book_model(doc: literate.Document) -> Book:
    """Blocks, chunks, files and uses, from a parsed and resolved document."""
    live = [b for b in doc.blocks if not b.commented]
    pieces = []
    for b in live:
        # A result block's #+name is what the prose cites it by, not a chunk of the program.
        result = {"value", "output"} & set(b.params.get("results", "").split())
        chunk = None if result else b.name or b.params.get("noweb-ref")
        target = literate.target_of(doc, b)
        refs = []
        if b.params.get("noweb", "no") != "no":
            for line in b.body:
                refs += [name for _, _, name in literate.noweb_refs(line)]
        pieces.append(Piece(b, f"blk-{b.line}", chunk, target, list(dict.fromkeys(refs))))
    # As tangle's Expander reads them: a #+name is one block; a :noweb-ref gathers blocks.
    chunks: dict[str, list[Piece]] = {}
    for p in pieces:
        if p.block.name and p.chunk:
            chunks[p.block.name] = [p]
        if ref := p.block.params.get("noweb-ref"):
            chunks.setdefault(ref, []).append(p)
    # Files collect their blocks in document order, whatever the language (as tangle_document).
    files: dict[str, list[Piece]] = {}
    for p in pieces:
        if p.target:
            files.setdefault(p.target, []).append(p)
    users: dict[str, list[Piece]] = {}
    for p in pieces:
        for name in p.refs:
            users.setdefault(name, []).append(p)
    return Book(doc, pieces, chunks, files, users)


def display_name(chunk: str) -> str:
    """How the book prints a chunk name: ⟨count loop⟩ for <<count-loop>>."""
    return chunk.replace("-", " ")


# ---------------------------------------------------------------------------
# The identifier index: where each top-level name of the code is defined and used
# ---------------------------------------------------------------------------
# Read from the tangled Python files, whose every line the source map traces to the
# Org line (so the block) it came from; blocks that tangle nowhere (the result blocks)
# are read on their own.

@dataclass
class Identifier:
    name: str
    file: str                             # the tangled file that defines it
    defined: Piece                        # the block its def, class or assignment is in
    users: list[Piece] = field(default_factory=list)   # the other blocks that use it


DEFS = (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)
SCOPES = (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.Lambda)
CHAINS = (pyast.Name, pyast.Attribute)


def assigned(node: pyast.AST) -> set[str]:
    """The names assigned anywhere inside node."""
    return {n.id for n in pyast.walk(node)
            if isinstance(n, pyast.Name) and isinstance(n.ctx, pyast.Store)}


def top_level_names(tree: pyast.Module) -> list[tuple[str, int]]:
    """(name, line) of every def, class and assignment at the top of a module, no __dunders__."""
    out = []
    for node in tree.body:
        if isinstance(node, DEFS):
            out.append((node.name, node.lineno))
        elif isinstance(node, (pyast.Assign, pyast.AnnAssign)):
            targets = node.targets if isinstance(node, pyast.Assign) else [node.target]
            out += [(name, node.lineno) for t in targets for name in sorted(assigned(t))]
    return [(name, line) for name, line in out if not name.startswith("__")]


def global_uses(tree: pyast.Module, file: str | None, modules: dict[str, str],
                defined: dict) -> list[tuple[tuple[str, str], int]]:
    """((file, name), line) of every place the code refers to a top-level name of a file.

    A global name is the file's own or one it imported (`from llm.train import main`);
    `train.main` names the file by its module. A name a function binds (a parameter,
    an assignment) is its own, whatever the module has by that name.
    """
    def file_of(module: str) -> str | None:       # llm.train or train -> build/llm/train.py
        return next((f for m, f in modules.items() if f".{m}".endswith(f".{module}")), None)

    imported = {a.asname or a.name: (file_of(node.module), a.name) for node in pyast.walk(tree)
                if isinstance(node, pyast.ImportFrom) and node.module for a in node.names}
    variables = assigned(tree) | {n.arg for n in pyast.walk(tree) if isinstance(n, pyast.arg)}
    out = []

    def visit(node: pyast.AST, local: frozenset) -> None:
        if isinstance(node, SCOPES):
            bound, declared = set(), set()
            for n in pyast.walk(node):
                if isinstance(n, pyast.Name) and isinstance(n.ctx, pyast.Store):
                    bound.add(n.id)
                elif isinstance(n, pyast.arg):
                    bound.add(n.arg)
                elif isinstance(n, pyast.Global):
                    declared.update(n.names)
            local = local | (bound - declared)
        key = None
        if isinstance(node, pyast.Name) and isinstance(node.ctx, pyast.Load):
            if node.id not in local:
                key = (file, node.id) if (file, node.id) in defined else imported.get(node.id)
        elif isinstance(node, pyast.Attribute) and isinstance(node.value, CHAINS):
            owner = node.value                   # train in train.main, llm.train in llm.train.main
            if getattr(owner, "id", None) not in variables:     # not a variable `model` (a GPT)
                key = (file_of(pyast.unparse(owner)), node.attr)
        if key in defined:
            out.append((key, node.lineno))
        for child in pyast.iter_child_nodes(node):
            visit(child, local)
    visit(tree, frozenset())
    return out


def identifiers(book: Book, outputs: dict[str, literate.Output]) -> list[Identifier]:
    """Every top-level name of the tangled Python files whose definition the book shows."""
    at = {k: p for p in book.pieces for k in range(p.block.line + 1, p.block.end_line)}
    files = {rel: pyast.parse(out.text) for rel, out in outputs.items() if rel.endswith(".py")}
    modules = {".".join(Path(rel).with_suffix("").parts): rel for rel in files}

    def block_of(rel: str, line: int) -> Piece | None:   # through the source map
        return at.get(outputs[rel].lines[line - 1].org_line)

    found: dict[tuple[str, str], Identifier] = {}
    for rel, tree in files.items():
        for name, line in top_level_names(tree):
            p = block_of(rel, line)
            if p and p.visible and (rel, name) not in found:
                found[rel, name] = Identifier(name, rel, p)
    uses = [(key, block_of(rel, line)) for rel, tree in files.items()
            for key, line in global_uses(tree, rel, modules, found)]
    tangled = {line.org_line for out in outputs.values() for line in out.lines}
    for p in book.pieces:         # the blocks no file holds: result blocks, examples
        if p.block.lang == "python" and tangled.isdisjoint(range(p.block.line, p.block.end_line)):
            try:
                tree = pyast.parse("\n".join(p.block.body))
            except SyntaxError:
                continue
            uses += [(key, p) for key, _ in global_uses(tree, None, modules, found)]
    for key, p in sorted(uses, key=lambda use: use[1].block.line if use[1] else 0):
        ident = found[key]
        if p and p.visible and p is not ident.defined and p not in ident.users:
            ident.users.append(p)
    return sorted(found.values(), key=lambda i: (i.name.casefold(), i.name, i.file))


# ---------------------------------------------------------------------------
# Tested by: the tests that run each block, from pdf/tested-by.json (tested_by.py)
# ---------------------------------------------------------------------------

TESTED_WIDTH = 72       # characters of test names on a chunk's "Tested by" line
LISTING = "#tested-by-listing()"    # where the book places the test listing (an export block)


def test_label(test: str) -> str:
    """`test_x.py::test_y` -> the Typst label of its entry in the listing, tb-test_x.test_y."""
    return "tb-" + re.sub(r"[^\w.-]", "-", test.replace(".py::", ".").replace("::", "."))


def test_short(test: str) -> str:
    """`test_x.py::test_y` -> test_y: how a chunk's label names it."""
    return test.split("::", 1)[-1]


def tested_arg(book: Book, p: Piece) -> str | None:
    """The `tested:` argument of a chunk: its most specific tests first, as many as fit."""
    rec = book.tested
    entry = rec.entries.get(p.block.line) if rec else None
    if entry is None:
        return None                     # no record, or no Python code of its own
    if entry.state != "tested":
        partial = ", partial: true" if not rec.complete else ""
        return f"(state: {typ_str(entry.state)}{partial})"
    # A test that runs few blocks says more about this one than a run of the whole program.
    order = sorted(entry.tests, key=lambda t: (len(rec.tests[t]), t))
    shown, width = [], 0
    for t in order:
        if shown and width + len(test_short(t)) > TESTED_WIDTH:
            break
        shown.append(t)
        width += len(test_short(t)) + 2
    items = "".join(f"({typ_str(test_short(t))}, "
                    f"{typ_str(test_label(t)) if book.listing else 'none'}), " for t in shown)
    return (f"(state: \"tested\", count: {len(entry.tests)}, tests: ({items}), "
            f"more: {len(entry.tests) - len(shown)}, listing: {'true' if book.listing else 'false'})")


def listing_source(book: Book) -> str:
    """`#let tested-by-listing() = [...]`: each test, by file, with the pages of the blocks
    it runs; the book places it with an export block holding `#tested-by-listing()`."""
    rec = book.tested
    if rec is None:
        body = ["No record says which tests run which block: `make tested-by` writes "
                f"`{tested_by.DATA}`."]
    else:
        visible = {p.block.line for p in book.pieces if p.visible}
        files: dict[str, list[str]] = {}
        for t in sorted(rec.tests):
            files.setdefault(t.split("::")[0], []).append(t)
        body = [f"#metadata(\"tests\") <tested-by-listing>"]
        if not rec.complete:
            body.append(f"_Measured on {rec.measured} tests, an interrupted run of the suite: "
                        "a block may be run by a test that is not listed._")
        for f, tests in sorted(files.items()):
            body += [f"#block(above: 1.1em, below: 0.6em, sticky: true, strong(raw({typ_str(f)})))"]
            for t in tests:
                ids = [f"blk-{line}" for line in rec.tests[t] if line in visible]
                pages = (f"[#pages-of(({', '.join(map(typ_str, ids))},))]" if ids
                         else "[blocks the book does not show]")
                body.append(f"#index-entry([#metadata(\"test\") <{test_label(t)}>"
                            f"#raw({typ_str(test_short(t))})], {pages})")
    return "#let tested-by-listing() = [\n" + "\n".join(body) + "\n]\n"


def tested_warnings(book: Book) -> list[str]:
    rec = book.tested
    if rec is not None and not rec.complete:
        return [f"{tested_by.DATA} is from an interrupted run ({rec.measured} tests): "
                "run `make tested-by`"]
    if rec is None or rec.current:
        return []
    changed = ", ".join(f"{book.doc.path.name}:{b.line}" for b in rec.changed[:5])
    more = f" and {len(rec.changed) - 5} more" if len(rec.changed) > 5 else ""
    return [f"{tested_by.DATA} was recorded on other code ({len(rec.changed)} blocks changed"
            + (f": {changed}{more}" if changed else "") + "): run `make tested-by`"]


# ---------------------------------------------------------------------------
# Computed output that fits the page
# ---------------------------------------------------------------------------
# A result printed as a block of text (what a command prints) is wrapped by the weave,
# never by the typesetter: a line wider than the page is cut at a space and continues
# on the next line after the mark ↪.

MONO_ADVANCE = 0.602        # DejaVu Sans Mono: every glyph is 0.602 em wide
A4_WIDTH_PT = 595.28        # 210 mm
UNIT_PT = {"pt": 1.0, "cm": 72 / 2.54, "mm": 72 / 25.4}
CONTINUED = "↪ "


def code_columns(typ: str) -> int:
    """Characters of code one line of a code block holds: the text width (A4 less the x
    margins) less the block's x inset on both sides, over one mono glyph at code-size."""
    def length(pattern: str) -> float:
        value, unit = re.search(pattern, typ, re.S).groups()
        return float(value) * UNIT_PT[unit]
    size = length(r"#let code-size = ([\d.]+)(pt)")
    margin = length(r"margin: \(x: ([\d.]+)(cm|mm|pt)")
    inset = length(r"raw\.where\(block: true\).*?inset: \(x: ([\d.]+)(pt)")
    return int((A4_WIDTH_PT - 2 * margin - 2 * inset) / (MONO_ADVANCE * size))


def columns(line: str) -> int:
    """Columns a line takes in a monospace font: wide (CJK) characters take two."""
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line.expandtabs(8))


def wrap_output(text: str, limit: int) -> str:
    """Each line wider than limit cut, at its last space that fits if it has one, into
    lines that continue after ↪."""
    out = []
    for line in text.expandtabs(8).split("\n"):
        first, room = True, limit
        while columns(line) > room:
            k, width = 0, 0
            while columns(line[k]) + width <= room:        # the longest head that fits
                width += columns(line[k])
                k += 1
            space = line.rfind(" ", 0, k + 1)
            cut = space if space >= max(1, room // 3) else k
            out.append(("" if first else CONTINUED) + line[:cut].rstrip())
            line, first = line[cut:].lstrip(" "), False
            room = limit - columns(CONTINUED)
        out.append(line if first else CONTINUED + line)
    return "\n".join(out)


# ---------------------------------------------------------------------------
# 2. Rewrite pandoc's AST
# ---------------------------------------------------------------------------

def marked_source(doc: literate.Document) -> str:
    """llm.org with `:weave-id LINE` on every #+begin_src line (line count unchanged).

    Pandoc keeps every header argument as an attribute, so each CodeBlock in its AST
    names the block of tangle's model it came from, however many blocks it dropped.
    """
    lines = list(doc.lines)
    for b in doc.blocks:
        lines[b.line - 1] = lines[b.line - 1].rstrip() + f" :weave-id {b.line}"
    return "\n".join(join_split_links(lines))


OPEN_LINK = re.compile(r"\[\[(?:(?!\]\]).)*$")   # a link still open where its line ends


def join_split_links(lines: list[str]) -> list[str]:
    """Org reads a link that runs over a line break; pandoc's Org reader leaves it as
    text. In prose, move the break out of the link (line count unchanged): the rest of
    the link joins its first line or, when nothing follows the link, its start moves down."""
    lines, block = list(lines), False
    for i in range(len(lines) - 1):
        marker = lines[i].lstrip().lower()
        if marker.startswith(("#+begin_", "#+end_")):
            block = marker.startswith("#+begin_")
            continue
        m = OPEN_LINK.search(lines[i])
        if block or not m or "]]" not in lines[i + 1]:
            continue
        rest, tail = lines[i + 1].split("]]", 1)
        if tail.strip():          # "... [[*How fast" / "is it?]] times them."
            lines[i] += " " + rest.strip() + "]]"
            lines[i + 1] = tail.lstrip()
        elif lines[i][:m.start()].strip():   # nothing after the link: its start moves down
            lines[i], lines[i + 1] = lines[i][:m.start()].rstrip(), (
                m.group() + " " + lines[i + 1].lstrip())
    return lines


def pandoc(doc: literate.Document, args: list[str], text: str) -> tuple[str, str]:
    """Run the pandoc that pypandoc-binary ships: (stdout, stderr)."""
    import subprocess
    import pypandoc
    # From the Org file's folder: the one its #+INCLUDE paths were checked against.
    run = subprocess.run([pypandoc.get_pandoc_path(), *args], input=text.encode("utf-8"),
                         capture_output=True, cwd=doc.path.resolve().parent)
    out, err = run.stdout.decode("utf-8"), run.stderr.decode("utf-8", "replace")
    if run.returncode != 0:
        m = re.search(r"line (\d+), column (\d+)\):\s*(.*)", err, re.S)
        if m:
            line, col = int(m.group(1)), int(m.group(2))
            detail = " ".join(m.group(3).split("\n")[:2]).strip()
            source = text.split("\n")[line - 1] if line <= text.count("\n") + 1 else ""
            if '\\"' in source:
                detail += ' (pandoc reads \\" as a LaTeX accent: write a plain " in prose)'
            raise TangleError(doc.path, line, f"pandoc cannot read column {col}: {detail}")
        raise TangleError(doc.path, None, f"pandoc failed: {err.strip()}")
    return out, err


INCLUDE = re.compile(r'^[ \t]*#\+include:[ \t]*(?:"([^"]*)"|(\S+))', re.I)


def check_includes(doc: literate.Document) -> None:
    """Every `#+INCLUDE:` names a file inside the book's folder, as images and targets must.

    Pandoc would embed any file it can read (`/etc/passwd`, `../secret`) and only warn
    about one it cannot find. An included file's own includes are read from its folder.
    """
    root = doc.path.resolve().parent
    code = set()
    for b in doc.blocks:                      # inside a source block the line is code
        code.update(range(b.line, b.end_line + 1))

    def included(text: str, folder: Path, skip: set[int]) -> list[tuple[int, str, Path]]:
        out = []
        for k, line in enumerate(text.split("\n"), 1):
            if k not in skip and (m := INCLUDE.match(line)):
                name = m.group(1) if m.group(1) is not None else m.group(2)
                out.append((k, name, folder))
        return out

    seen: set[Path] = set()
    todo = [(k, k, name, folder, None) for k, name, folder
            in included("\n".join(doc.lines), root, code)]
    while todo:
        org_line, k, name, folder, parent = todo.pop(0)
        via = f" (line {k} of {parent.relative_to(root).as_posix()})" if parent else ""
        shown = literate.short(name)
        if not name.strip():
            raise TangleError(doc.path, org_line, f"#+INCLUDE without a file name{via}")
        p = Path(name)
        if p.is_absolute() or name.startswith("~") or ".." in p.parts:
            raise TangleError(doc.path, org_line, f"#+INCLUDE: {shown}{via}: only files inside "
                              "the book's folder can be included (no absolute path, no '..')")
        try:
            real = (folder / p).resolve()
            inside = real == root or root in real.parents
            found = real.is_file()
        except (OSError, RuntimeError, ValueError) as e:
            raise TangleError(doc.path, org_line, f"#+INCLUDE: {shown}{via}: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        if not inside:
            raise TangleError(doc.path, org_line, f"#+INCLUDE: {shown}{via} leads outside the "
                              f"book's folder through a symlink (to {literate.short(str(real))})")
        if not found:
            raise TangleError(doc.path, org_line, f"#+INCLUDE: {shown}{via} not found (looked "
                              f"for {literate.short(str(real))})")
        if real in seen or len(seen) > 100:
            continue
        seen.add(real)
        try:
            text = real.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        todo += [(org_line, j, n, real.parent, real) for j, n, _ in
                 included(text, real.parent, set())]


def read_org(doc: literate.Document, text: str) -> dict:
    out, _ = pandoc(doc, ["--from=org", "--to=json"], text)
    return json.loads(out)


def el(t: str, c=None) -> dict:
    return {"t": t} if c is None else {"t": t, "c": c}


def typ(code: str) -> dict:
    return el("RawInline", ["typst", code])


def typ_block(code: str) -> dict:
    return el("RawBlock", ["typst", code])


def typ_str(s: str) -> str:
    """A Typst string literal."""
    out = []
    for ch in s:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ch == "\x7f":
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def stringify(x) -> str:
    if isinstance(x, list):
        return "".join(stringify(y) for y in x)
    if isinstance(x, dict):
        t, c = x.get("t"), x.get("c")
        if t == "Str":
            return c
        if t in ("Space", "SoftBreak", "LineBreak"):
            return " "
        if t in ("Code", "Math", "RawInline"):
            return c[1]
        if t in ("Link", "Image", "Span"):
            return stringify(c[1])
        if t in ("Quoted",):
            return stringify(c[1])
        if t == "Cite":
            return stringify(c[1])
        return stringify(c) if isinstance(c, list) else ""
    return ""


def strip_tags(title: str) -> str:
    """An Org heading's title without its :tags: and [#A] priority cookie."""
    title = re.sub(r"[ \t]+:[\w@#%:]+:[ \t]*$", "", title)
    return re.sub(r"^\[#.\][ \t]+", "", title)


def untagged(inlines: list) -> list:
    """A heading's inlines without pandoc's spans for Org :tags: (the book does not print them)."""
    out = [x for x in inlines if not (x.get("t") == "Span" and "tag" in x["c"][0][1])]
    while out and out[-1].get("t") in ("Space", "SoftBreak"):
        out.pop()
    return out


def norm_title(s: str) -> str:
    return re.sub(r"[^0-9a-z]+", "", s.lower())


PART = re.compile(r"^(Part\b|Appendi)", re.I)
ENV = re.compile(r"^\s*\\begin\{(equation|align|gather|multline|eqnarray)(\*?)\}(.*)\\end\{\1\2\}\s*$", re.S)
LABEL = re.compile(r"\\label\{([^}]*)\}")
REF = re.compile(r"^\s*\\(eqref|ref|autoref|cref|Cref)\{([^}]*)\}\s*$")
BLOCK_TYPES = {"Plain", "Para", "LineBlock", "CodeBlock", "RawBlock", "BlockQuote", "OrderedList",
               "BulletList", "DefinitionList", "Header", "HorizontalRule", "Table", "Figure", "Div"}


class Rewriter:
    """One pass over pandoc's AST that makes it a book."""

    def __init__(self, book: Book, ast: dict, res: results.Results | None = None):
        self.book, self.doc, self.ast = book, book.doc, ast
        self.results = res or results.Results(book.doc, {})
        self.lines = self.doc.lines
        self.name = self.doc.path.name
        self.root = self.doc.path.resolve().parent
        self.cursor = 1                          # the Org line we are at, for markers
        self.pieces = {p.id: p for p in book.pieces}
        self.headings = [h for h in self.doc.headings if not h.commented]
        self.heading_ids: dict[str, tuple[str, list]] = {}   # normalized title -> (id, inlines)
        self.floats: dict[str, str] = {}          # #+name of figures and tables -> kind
        self.equations: set[str] = set()
        self.warnings: list[str] = []
        self.dollar_lines: set[int | None] = set()   # lines already warned of a stray $
        self.columns = code_columns(TEMPLATE.read_text(encoding="utf-8"))

    # -- helpers ------------------------------------------------------------
    def mark(self, line: int | None = None) -> str:
        return MARK.format(name=self.name, line=line or self.cursor)

    def find_line(self, needle: str, start: int | None = None) -> int | None:
        """The first Org line at or after `start` that contains needle (or anywhere)."""
        first = needle.strip().split("\n")[0].strip()
        if not first:
            return None
        begin = (start or self.cursor) - 1
        for k in list(range(begin, len(self.lines))) + list(range(0, begin)):
            if first in self.lines[k]:
                return k + 1
        return None

    def advance(self, needle: str) -> int:
        line = self.find_line(needle)
        if line is not None and line >= self.cursor:
            self.cursor = line
        return line or self.cursor

    def error(self, line: int | None, message: str) -> TangleError:
        return TangleError(self.doc.path, line, message)

    # -- the pass -------------------------------------------------------------
    def run(self) -> list:
        self.collect(self.ast["blocks"])
        return self.sections(self.ast["blocks"])

    def collect(self, blocks) -> None:
        """Names that links can point at: headings, figures, tables, equation labels."""
        def walk(x):
            if isinstance(x, list):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                t, c = x.get("t"), x.get("c")
                if t == "Header":
                    c[2] = untagged(c[2])
                    self.heading_ids.setdefault(norm_title(stringify(c[2])), (c[1][0], c[2]))
                elif t == "Figure" and c[0][0]:
                    self.floats[c[0][0]] = "figure"
                elif t == "Table" and c[0][0]:
                    self.floats[c[0][0]] = "table"
                elif t in ("RawInline", "RawBlock") and c[0] == "latex":
                    for lab in LABEL.findall(c[1]):
                        if lab in self.equations:
                            hits = [k + 1 for k, s in enumerate(self.lines) if f"\\label{{{lab}}}" in s]
                            raise self.error(hits[1] if len(hits) > 1 else None,
                                             f"\\label{{{lab}}} is used twice")
                        self.equations.add(lab)
                if isinstance(c, (list, dict)):
                    walk(c)
        walk(blocks)

    def sections(self, blocks: list) -> list:
        """Top level: give headings their role (part, chapter, section), then the rest."""
        out = []
        demote = 0                  # a level-1 heading that is not a part is a chapter
        unnumbered_from = None      # level of an UNNUMBERED non-part heading above us
        in_main = False
        heading_k = 0
        for k, x in enumerate(blocks):
            if x["t"] != "Header":
                out += self.block(x)
                continue
            level, attr, inlines = x["c"]
            title = stringify(inlines)
            # The tangle heading this is (pandoc skips COMMENT subtrees, as tangle does).
            h = None
            for j in range(heading_k, len(self.headings)):
                hj = self.headings[j]
                if hj.level == level and norm_title(strip_tags(hj.title)) == norm_title(title):
                    h, heading_k = hj, j + 1
                    break
            line = h.line if h else self.advance(title)
            self.cursor = max(self.cursor, line)
            props = h.props if h else {}
            unnumbered = (props.get("unnumbered", (None, []))[0] or "nil").lower() not in ("nil", "")
            rest_empty = k + 1 == len(blocks) or blocks[k + 1]["t"] == "Header"
            if level == 1 and title.strip() == "Footnotes" and rest_empty:
                continue        # Org's footnote section: Typst puts notes on their pages
            if unnumbered_from is not None and level <= unnumbered_from:
                unnumbered_from = None
            classes = [c for c in attr[1] if c != "unnumbered"]
            if level == 1 and PART.match(title):
                demote = 0
                if not in_main:
                    out += self.matter("mainmatter")
                    in_main = True
                if unnumbered:
                    out += self.matter("appendices")
                new_level, numbered = 1, False
            else:
                if level == 1:
                    demote = 1      # the Preface: a chapter, its sections one level down
                new_level = level + demote
                if unnumbered and unnumbered_from is None:
                    unnumbered_from = level
                numbered = unnumbered_from is None and new_level <= 4
            if not numbered:
                classes.append("unnumbered")
            elif not in_main:       # a book without parts: page 1 is the first chapter's
                out += self.matter("mainmatter")
                in_main = True
            out += self.heading(line, new_level, [attr[0], classes, []], self.inlines(inlines))
        return out

    # -- what the typesetting language writes (the web edition overrides these) -----------
    def mark_inline(self, line: int | None = None) -> list:
        """A comment naming the Org line, so Typst's errors can be traced back to it."""
        return [typ(self.mark(line))]

    def mark_block(self, line: int | None = None) -> list:
        return [typ_block(self.mark(line))]

    def matter(self, kind: str) -> list:
        """Where the main matter ("mainmatter") or the appendices ("appendices") begin."""
        return [typ_block(f"#show: {kind}")]

    def heading(self, line: int, level: int, attr: list, inlines: list) -> list:
        """A heading in its book role: 1 part, 2 chapter, 3 section, 4 subsection."""
        return self.mark_block(line) + [el("Header", [level, attr, inlines])]

    def caption_note(self, inlines: list) -> list:
        """The #+CAPTION of a source block, above it."""
        return [el("Plain", [typ("#block(below: 0em, sticky: true, small-note(emph[")]
                    + inlines + [typ("]))")])]

    def chunk_link(self, name: str, p: Piece) -> list:
        """[[chunk-name]] in the prose: ⟨chunk name⟩, a link to its first block."""
        return [typ(f"#chunk-name({typ_str(display_name(name))}, dest: {typ_str(p.id)})")]

    def float_ref(self, target: str) -> list:
        """[[fig-x]]: the number of a figure or table, as Org exports it."""
        return [typ(f"#ref(label({typ_str(target)}), supplement: none)")]

    def numbered_equation(self, math: dict, label: str | None) -> list:
        tail = f" <{label}>" if label else ""
        return [typ("#numbered["), math, typ(tail + "]")]

    def equation_ref(self, kind: str, label: str) -> list:
        sup = ", supplement: none" if kind == "eqref" else ""
        return [typ(f"#ref(label({typ_str(label)}){sup})")]

    def image_url(self, rel: str) -> str:
        """The address of an image of the book's folder (rel: its path there)."""
        return "/" + rel

    def blocks(self, xs: list) -> list:
        out = []
        for x in xs:
            out += self.block(x)
        return out

    def block(self, x: dict) -> list:
        t, c = x["t"], x.get("c")
        if t == "CodeBlock":
            return self.code(x)
        if t == "RawBlock":
            fmt, text = c
            if fmt == "latex":
                return [el("Para", self.latex(text))]
            if fmt == "org":
                return []       # #+PROPERTY lines, #+STARTUP and the like
            return [x]
        if t in ("Para", "Plain"):
            if placed := self.placed_result(c):
                return placed
            return [el(t, self.inlines(c))]
        if t == "Header":
            return [el(t, [c[0], c[1], self.inlines(c[2])])]
        if t == "Figure":
            return [self.figure(x)]
        if t == "Div" and "captioned-content" in c[0][1]:
            # #+CAPTION on a source block: the caption in small italics, then the block.
            caption = [b for b in c[1] if b["t"] == "Div" and "caption" in b["c"][0][1]]
            rest = [b for b in c[1] if b not in caption]
            text = [i for b in caption for p in b["c"][1] if p["t"] in ("Para", "Plain") for i in p["c"]]
            head = self.caption_note(self.inlines(text)) if text else []
            return head + self.blocks(rest)
        if t == "Div":
            return [el(t, [c[0], self.blocks(c[1])])]
        if t == "BlockQuote":
            return [el(t, self.blocks(c))]
        if t in ("BulletList",):
            return [el(t, [self.blocks(item) for item in c])]
        if t == "OrderedList":
            return [el(t, [c[0], [self.blocks(item) for item in c[1]]])]
        if t == "DefinitionList":
            return [el(t, [[self.inlines(term), [self.blocks(d) for d in defs]] for term, defs in c])]
        if t == "LineBlock":
            return [el(t, [self.inlines(line) for line in c])]
        if t == "Table":
            return [self.table(x)]
        return [x]

    def table(self, x: dict) -> dict:
        attr, caption, colspecs, head, bodies, foot = x["c"]
        self.advance("|")

        def cells(rows):
            return [[r[0], [[cell[0], cell[1], cell[2], cell[3], self.blocks(cell[4])]
                            for cell in r[1]]] for r in rows]
        # Org aligns a column right when most of its filled cells are numbers, else left.
        number = re.compile(r"^[-+]?[\d.,_]+(e[-+]?\d+)?%?$", re.I)
        rows = [r for b in bodies for r in b[3]]
        specs = []
        for k, (align, width) in enumerate(colspecs):
            if align["t"] == "AlignDefault":
                filled = [t for r in rows if k < len(r[1]) and (t := stringify(r[1][k][4]).strip())]
                numeric = [t for t in filled if number.match(t)]
                align = el("AlignRight" if numeric and 2 * len(numeric) >= len(filled) else "AlignLeft")
            specs.append([align, width])
        colspecs = specs
        caption = [caption[0], self.blocks(caption[1])]
        head = [head[0], cells(head[1])]
        bodies = [[b[0], b[1], cells(b[2]), cells(b[3])] for b in bodies]
        foot = [foot[0], cells(foot[1])]
        return el("Table", [attr, caption, colspecs, head, bodies, foot])

    def figure(self, x: dict) -> dict:
        attr, caption, body = x["c"]
        # #+ATTR_HTML: :width 60% lands on the Figure, where the Typst writer ignores it.
        moved = [kv for kv in attr[2] if kv[0] in ("width", "height")]
        def size(b):
            if b.get("t") == "Image" and moved:  # before self.blocks() turns it into a list
                a = b["c"][0]
                b = el("Image", [[a[0], a[1], a[2] + moved], b["c"][1], b["c"][2]])
            return b
        body = [el(b["t"], [size(i) for i in b["c"]]) if b.get("t") in ("Plain", "Para") else b
                for b in body]
        attr = [attr[0], attr[1], [kv for kv in attr[2] if kv not in moved]]
        return el("Figure", [attr, [caption[0], self.blocks(caption[1])], self.blocks(body)])

    # -- code -----------------------------------------------------------------
    def code(self, x: dict) -> list:
        (_, classes, kvs), text = x["c"]
        kv = dict(kvs)
        if "weave-id" not in kv:
            return [x]          # an example block or results: plain verbatim text
        p = self.pieces.get(f"blk-{kv['weave-id']}")
        if p is None:
            # A block tangle skips (under a COMMENT heading) that pandoc kept.
            return [el("CodeBlock", [["", classes, []], text])]
        self.cursor = max(self.cursor, p.block.line)
        return self.chunk_block(p)

    def chunk_block(self, p: Piece) -> list:
        """A shown source block with its label line (⟨name⟩≡ → file) and cross-references."""
        b, book = p.block, self.book
        args = []
        if p.chunk:
            args.append(f"name: {typ_str(display_name(p.chunk))}")
            first = book.chunks[p.chunk][0]
            if first is not p:
                args.append("plus: true")
        if p.target:
            args.append(f"file: {typ_str(p.target)}")
        prev, nxt = book.neighbours(p)
        if prev:
            args.append(f"prev: {typ_str(prev.id)}")
        if nxt:
            args.append(f"next: {typ_str(nxt.id)}")
        used = []
        for u in book.used_in(p):
            if not u.visible:
                continue
            what = (f"chunk-name({typ_str(display_name(u.chunk))})" if u.chunk
                    else f"raw({typ_str(u.target)})" if u.target else "[a block]")
            used.append(f"({what}, {typ_str(u.id)})")
        if used:
            args.append(f"used: ({', '.join(used)},)")
        if p.refs:
            args.append("noweb: chunk-targets")
        if (tested := tested_arg(book, p)) is not None:
            args.append(f"tested: {tested}")
        lang = b.lang
        args.append(f"lang: {typ_str(lang)}")
        # The body as Org gives it (escapes and common indentation removed).
        body = "\n".join(b.body)
        code = f"raw(block: true, lang: {typ_str(lang)}, {typ_str(body)})"
        return [typ_block(f"{self.mark(b.line)}\n#metadata(\"chunk\") <{p.id}>\n"
                          f"#chunk({', '.join(args)}, {code})")]

    # -- inlines --------------------------------------------------------------
    def inlines(self, xs: list) -> list:
        out = []
        for k, x in enumerate(xs):
            if x.get("t") == "Str" and "$" in x["c"] and x["c"].strip() != "$":
                self.stray_dollar(xs[k:k + 6])    # (a lone "$" closes one already reported)
            out += self.inline(x)
        return out

    def stray_dollar(self, xs: list) -> None:
        """Warn about a $ that is not math: `$x $` or `$ x$` are plain text in Org."""
        flat = [" ".join(s.split()) for s in self.lines]
        context, lines = stringify(xs), []
        while len(context) >= len(xs[0]["c"]) and not lines:
            lines = [k + 1 for k, s in enumerate(flat) if context in s]
            context = context[:-1]
        line = next((n for n in lines if n not in self.dollar_lines), lines[0] if lines else None)
        self.dollar_lines.add(line)
        self.warnings.append(f"{self.name}:{line or '?'}: a $ that is not math: {xs[0]['c']!r} "
                             "(Org reads $x$ only with no space just inside the dollars)")

    def inline(self, x: dict) -> list:
        t, c = x["t"], x.get("c")
        if t == "Span" and "spurious-link" in c[0][1]:
            return self.link(dict(c[0][2]).get("target", ""), c[1])
        if t == "RawInline" and c[0] == "latex":
            return self.latex(c[1])
        if t == "Math":
            line = self.advance(c[1])
            return self.mark_inline(line) + [el("Math", [c[0], grouped_digits(c[1])])]
        if t == "Image":
            return self.image(x)
        if t in ("Emph", "Strong", "Strikeout", "Superscript", "Subscript", "SmallCaps", "Underline"):
            return [el(t, self.inlines(c))]
        if t == "Span":
            return [el(t, [c[0], self.inlines(c[1])])]
        if t == "Link" and c[2][0].startswith("result:"):
            return self.result_link(c[2][0][len("result:"):], c[1])
        if t == "Link":
            url = c[2][0]
            if url.startswith("#") and stringify(c[1]).strip() in ("", url):
                # [[#custom-id]] without a description: show what it points to.
                title = next((inl for ident, inl in self.heading_ids.values() if ident == url[1:]), None)
                if title is not None:
                    return [el(t, [c[0], [el("Emph", self.inlines(title))], c[2]])]
            return [el(t, [c[0], self.inlines(c[1]), c[2]])]
        if t == "Quoted":
            return [el(t, [c[0], self.inlines(c[1])])]
        if t == "Note":
            return [el(t, self.blocks(c))]
        if t == "Cite":
            return [el(t, [c[0], self.inlines(c[1])])]
        return [x]

    # -- results --------------------------------------------------------------
    def result_value(self, ref: str):
        line = self.find_line(f"[[result:{ref}]")
        if line:
            self.cursor = max(self.cursor, line)
        try:
            return line, results.lookup(self.results, ref)
        except KeyError as e:
            raise self.error(line, f"[[result:{ref}]]: {e.args[0]}") from None

    def result_link(self, ref: str, content: list) -> list:
        """[[result:NAME.KEY][as written]]: the value the code computes, in the written format."""
        desc = stringify(content)
        desc = None if desc.strip() == f"result:{ref}" else desc
        line, value = self.result_value(ref)
        if isinstance(value, (list, dict)):
            raise self.error(line, f"[[result:{ref}]] is a table: place it alone in a paragraph")
        if desc is not None and not results.agrees(value, desc):
            self.warnings.append(f"{self.name}:{line}: [[result:{ref}]]: the prose says {desc!r}, "
                                 f"the code computes {results.render(value, desc)!r}; the book "
                                 "prints the computed value")
        return self.mark_inline(line) + [el("Str", results.render(value, desc))]

    def placed_result(self, inlines: list) -> list | None:
        """A paragraph holding only [[result:NAME]] of a table or multi-line text: the table."""
        real = [x for x in inlines if x.get("t") not in ("Space", "SoftBreak")]
        if len(real) != 1 or real[0].get("t") != "Link" or \
                not real[0]["c"][2][0].startswith("result:"):
            return None
        ref = real[0]["c"][2][0][len("result:"):]
        line, value = self.result_value(ref)
        if isinstance(value, str) and "\n" in value:
            text = wrap_output(value.rstrip("\n"), self.columns)
            return self.mark_block(line) + [el("CodeBlock", [["", [], []], text])]
        if not isinstance(value, list):
            return None
        if not value or not all(isinstance(r, list) and len(r) == len(value[0]) for r in value):
            raise self.error(line, f"[[result:{ref}]]: a table is a list of rows of equal length, "
                             "the first the header")

        def row(cells):
            return [["", [], []], [[["", [], []], el("AlignDefault"), 1, 1,
                                    [el("Plain", [el("Str", results.render(v))])]] for v in cells]]
        table = el("Table", [["", [], []], [None, []],
                             [[el("AlignDefault"), el("ColWidthDefault")] for _ in value[0]],
                             [["", [], []], [row(value[0])]],
                             [[["", [], []], 0, [], [row(r) for r in value[1:]]]],
                             [["", [], []], []]])
        cursor = self.cursor
        table = self.table(table)
        self.cursor = cursor                # table() looks for its | lines: there are none
        return self.mark_block(line) + [table]

    def image(self, x: dict) -> list:
        attr, alt, (url, title) = x["c"]
        if re.match(r"^[a-z][a-z0-9+.-]*://", url):
            raise self.error(self.find_line(url), f"remote image {url}: the book needs a local file")
        path = url[5:] if url.startswith("file:") else url
        line = self.advance(path)
        real = (self.root / path).resolve()
        if not real.is_file():
            raise self.error(line, f"image {path} not found (looked for {real})")
        try:
            rel = real.relative_to(self.root).as_posix()
        except ValueError:
            raise self.error(line, f"image {path} is outside the book's folder") from None
        return self.mark_inline(line) + [el("Image", [attr, self.inlines(alt),
                                                      [self.image_url(rel), title]])]

    def link(self, target: str, content: list) -> list:
        """[[*Heading]], [[name]] and [[name][description]]: real links, or an error."""
        shown = stringify(content)
        described = shown.strip() != target.strip()
        desc = self.inlines(content) if described else None
        line = self.find_line(f"[[{target}")
        if line:
            self.cursor = max(self.cursor, line)
        mark = self.mark_inline(line)
        name = target[1:] if target.startswith("*") else target
        if not target.startswith("*"):
            if target in self.book.chunks:
                p = self.book.first_definition(target)
                if p is None:
                    raise self.error(line, f"[[{target}]]: chunk {target} is never shown "
                                     "(all its blocks are :exports none)")
                if desc:
                    return mark + [el("Link", [["", [], []], desc, ["#" + p.id, ""]])]
                return mark + self.chunk_link(target, p)
            if target in self.floats or target in self.equations:
                if desc:
                    return mark + [el("Link", [["", [], []], desc, ["#" + target, ""]])]
                # As Org exports it: the number alone ("Table [[tab-x]]" -> "Table 2").
                return mark + self.float_ref(target)
        hit = self.heading_ids.get(norm_title(name))
        if hit:
            ident, inlines = hit
            body = desc or [el("Emph", self.inlines(inlines))]
            return mark + [el("Link", [["", [], []], body, ["#" + ident, ""]])]
        what = ("no heading titled" if target.startswith("*")
                else "no chunk, figure, table or heading named")
        # Org's export stops on a broken link unless #+OPTIONS: broken-links:t or :mark.
        broken = org_options(self.doc).get("broken-links", "nil")
        if broken == "mark":
            self.warnings.append(f"{self.name}:{line}: [[{target}]]: {what} {name!r}")
            return mark + [el("Strong", [el("Str", f"[BROKEN LINK: {target}]")])]
        if broken == "t":
            return mark + (desc or [el("Emph", [el("Str", name)])])
        raise self.error(line, f"[[{target}]]: {what} {name!r} (while chapters are missing, "
                         "#+OPTIONS: broken-links:mark weaves anyway)")

    def latex(self, text: str) -> list:
        """Raw LaTeX pandoc kept: equation environments and \\eqref; anything else is dropped."""
        line = self.advance(text)
        mark = self.mark_inline(line)
        if m := ENV.match(text):
            env, star, inner = m.groups()
            labels = LABEL.findall(inner)
            inner = LABEL.sub("", inner)
            inner = re.sub(r"\\(nonumber|notag)\b", "", inner).strip()
            if env in ("align", "eqnarray"):
                inner = f"\\begin{{aligned}}{inner}\\end{{aligned}}"
            elif env in ("gather", "multline"):
                inner = f"\\begin{{gathered}}{inner}\\end{{gathered}}"
            math = el("Math", [el("DisplayMath"), grouped_digits(inner)])
            if star:
                return mark + [math]
            if len(labels) > 1:
                raise self.error(line, f"one \\label per equation, got {', '.join(labels)}")
            if labels and not re.fullmatch(r"[\w:.-]+", labels[0]):
                raise self.error(line, f"\\label{{{labels[0]}}}: use letters, digits and - _ : . only")
            return mark + self.numbered_equation(math, labels[0] if labels else None)
        if m := REF.match(text):
            kind, lab = m.groups()
            if lab not in self.equations and lab not in self.floats:
                raise self.error(line, f"\\{kind}{{{lab}}}: no \\label{{{lab}}} in the book")
            return mark + self.equation_ref(kind, lab)
        self.warnings.append(f"{self.name}:{line}: raw LaTeX the book cannot typeset, left out: "
                             f"{text.strip()[:60]}")
        return []


def grouped_digits(tex: str) -> str:
    """7{,}087{,}872 as one upright number: Typst would set each comma as punctuation, spaced."""
    return re.sub(r"\d{1,3}(?:\{,\}\d{3})+", lambda m: "\\text{" + m[0].replace("{,}", ",") + "}", tex)


# ---------------------------------------------------------------------------
# 3. Typeset
# ---------------------------------------------------------------------------

# Symbol names pandoc 3.9 writes that the Typst of the `typst` wheel (0.15) no longer knows,
# found by converting every math character of Unicode's math blocks and compiling the result.
# Each becomes its character, which Typst takes as it is.
TYPST_RENAMED = {
    "sect": "\u2229", "sect.sq": "\u2293", "minus.circle": "\u2296", "times.circle": "\u2297",
    "dot.circle": "\u2299", "eq.circle": "\u229c", "dash.circle": "\u229d",
    "sect.big": "\u22c2", "sect.double": "\u22d2", "bracket.l.double": "\u27e6",
    "bracket.r.double": "\u27e7", "shell.l.double": "\u27ec", "shell.r.double": "\u27ed",
    "plus.circle.arrow": "\u27f4", "brace.l.double": "\u2983", "brace.r.double": "\u2984",
    "paren.l.double": "\u2985", "paren.r.double": "\u2986", "angle.right.sq": "\u299c",
    "angle.spheric.top": "\u29a1", "angle.oblique": "\u29a6", "bar.v.circle": "\u29b6",
    "parallel.circle": "\u29b7", "backslash.circle": "\u29b8", "perp.circle": "\u29b9",
    "lt.circle": "\u29c0", "gt.circle": "\u29c1", "dot.circle.big": "\u2a00",
    "times.circle.big": "\u2a02", "sect.sq.big": "\u2a05", "integral.sect": "\u2a19",
    "div.circle": "\u2a38", "sect.dot": "\u2a40", "sect.and": "\u2a44",
    "sect.sq.double": "\u2a4e", "quote.angle.l.double": "\u00ab",
    "quote.angle.r.double": "\u00bb",

}
SYMBOL_NAME = re.compile(r"(?<![\w.])[a-z]+(?:\.[a-z]+)*")


def fix_math(typst_math: str) -> str:
    """Replace outdated symbol names, outside the quoted strings of upright text."""
    def repl(m):
        parts = m.group(0).split(".")
        for k in range(len(parts), 0, -1):
            name = ".".join(parts[:k])
            if name in TYPST_RENAMED:
                return TYPST_RENAMED[name] + "".join("." + p for p in parts[k:])
        return m.group(0)
    pieces = re.split(r'("(?:\\.|[^"\\])*")', typst_math)
    for k in range(0, len(pieces), 2):
        pieces[k] = SYMBOL_NAME.sub(repl, pieces[k])
    return "".join(pieces)


def write_typst(doc: literate.Document, ast: dict) -> str:
    """Pandoc's Typst writer, with every formula converted on its own and fixed up.

    Each Math node is replaced by a placeholder, and its TeX goes to a paragraph of its
    own after the book, so one pandoc run converts both and each formula comes back
    alone. TeX that pandoc cannot convert is an error at its Org line (pandoc would print
    the TeX source into the book and only warn).
    """
    nodes = []

    def walk(x):
        if isinstance(x, dict):
            if x.get("t") == "Math":
                nodes.append(dict(x))
                x.clear()
                x.update(t="RawInline", c=["typst", f"WEAVE-MATH-{len(nodes) - 1}."])
            else:
                walk(x.get("c"))
        elif isinstance(x, list):
            for y in x:
                walk(y)
    walk(ast["blocks"])
    tail = [el("Para", [el("Str", "WEAVE-MATHS-FOLLOW")])]
    for k, n in enumerate(nodes):
        tail += [el("Para", [el("Str", f"WEAVE-MATH-{k}")]),
                 el("Para", [el("Math", [el("InlineMath"), n["c"][1]])])]
    ast = dict(ast, blocks=ast["blocks"] + tail)
    out, err = pandoc(doc, ["--from=json", "--to=typst", "--wrap=none"], json.dumps(ast))
    for m in re.finditer(r"Could not convert TeX math (.*?), rendering as TeX:\n(.*?)(?=\n\S|\Z)",
                         err, re.S):
        tex = m.group(1).strip()
        line = next((k + 1 for k, s in enumerate(doc.lines) if tex.split("\n")[0].strip() in s), None)
        why = m.group(2).strip().split("\n")
        reason = why[2].strip() if len(why) > 2 else ""
        raise TangleError(doc.path, line, f"pandoc cannot turn this math into Typst: {tex} ({reason})")
    body, _, maths = out.partition("WEAVE-MATHS-FOLLOW")
    pieces = re.split(r"^WEAVE-MATH-(\d+)[ \t]*$", maths, flags=re.M)
    typst_math = {}
    for k in range(1, len(pieces), 2):
        text = pieces[k + 1].strip()
        assert text.startswith("$") and text.endswith("$"), text
        inner = fix_math(text[1:-1])
        display = nodes[int(pieces[k])]["c"][0]["t"] == "DisplayMath"
        typst_math[pieces[k]] = f"$ {inner.strip()} $" if display else f"${inner}$"
    body = re.sub(r"WEAVE-MATH-(\d+)\.", lambda m: typst_math[m.group(1)], body)
    # The writer puts figure captions on lines of their own: the newlines would print as spaces.
    return re.sub(r"caption: \[\n\s*(.*?)\n\s*\]", r"caption: [\1]", body)


def org_keyword(doc: literate.Document, key: str) -> str | None:
    pat = re.compile(rf"^#\+{key}:[ \t]*(.*?)[ \t]*$", re.I)
    for line in doc.lines:
        if m := pat.match(line):
            return m.group(1)
    return None


def org_options(doc: literate.Document) -> dict[str, str]:
    """`#+OPTIONS: key:value ...` lines, merged."""
    out = {}
    for line in doc.lines:
        if m := re.match(r"^#\+options:(.*)$", line, re.I):
            for item in m.group(1).split():
                key, _, value = item.partition(":")
                out[key.lower()] = value
    return out


def index_chunks(book: Book) -> list[tuple[str, list[Piece], list[Piece]]]:
    """(name, its shown blocks, the shown blocks that use it) of every chunk the book
    shows, in the order of the index: the PDF's and the web edition's."""
    out = []
    for name in sorted(book.chunks, key=lambda n: display_name(n).casefold()):
        shown = book.shown(book.chunks[name])
        if shown:
            out.append((name, shown, [u for u in book.users.get(name, []) if u.visible]))
    return out


def index_source(book: Book) -> str:
    """The chunk index, the list of files and the identifier index, as Typst (each if not empty)."""
    def ids(pieces: list[Piece]) -> str:
        return ", ".join(typ_str(p.id) for p in pieces) + ","

    chunks = []
    for name, shown, users in index_chunks(book):
        used = f"[used #pages-of(({ids(users)}))]" if users else "[not used]"
        chunks.append(f"#index-entry(chunk-name({typ_str(display_name(name))}, "
                      f"dest: {typ_str(shown[0].id)}), [defined #pages-of(({ids(shown)}))], {used})")
    files = [f"#index-entry(raw({typ_str(target)}), [#pages-of(({ids(book.shown(pieces))}))])"
             for target, pieces in sorted(book.files.items()) if book.shown(pieces)]
    out = []
    if chunks:
        out += ["", "#heading(level: 2, numbering: none)[Index of chunks]", "",
                "Each chunk: the pages where it is defined, then the pages of the blocks that use it.",
                "", "#columns(2, gutter: 1.5em)[", *chunks, "]"]
    if files:
        out += ["", "#heading(level: 2, numbering: none)[Files the book builds]", "",
                "Each file: the pages of its blocks, in the order they are written to it.", "", *files]
    if book.identifiers:
        out += ["", "#heading(level: 2, numbering: none)[Index of identifiers]", "",
                "Each top-level name of the code: its file, the page that defines it, then the "
                "pages of the blocks that use it.", "", "#columns(2, gutter: 1.5em)[",
                *map(identifier_entry, book.identifiers), "]"]
    return "\n".join(out) + "\n"


def identifier_entry(ident: Identifier) -> str:
    """`GPT model.py defined 45 used 50, 61`: the name links to its definition."""
    p = ident.defined
    used = ", ".join(typ_str(u.id) for u in ident.users)
    return (f"#index-entry(link(label({typ_str(p.id)}), raw({typ_str(ident.name)})), "
            f"text(size: 0.8em, fill: muted, raw({typ_str(Path(ident.file).name)})), "
            f"[defined #pages-of(({typ_str(p.id)},))], "
            + (f"[used #pages-of(({used},))])" if used else "[])"))


def typst_source(book: Book, body: str) -> str:
    doc = book.doc
    targets = []
    for name in sorted(book.chunks):
        p = book.first_definition(name)
        targets.append(f"  {typ_str(name)}: {typ_str(p.id) if p else 'none'},")
    meta = {k: org_keyword(doc, k) for k in ("title", "subtitle", "author")}
    args = ", ".join(f"{k}: {typ_str(v) if v else 'none'}" for k, v in meta.items())
    return (TEMPLATE.read_text(encoding="utf-8")
            + f"\n// ---- generated by weave.py from {doc.path.name} ----\n"
            + "#let chunk-targets = (\n" + "\n".join(targets or ["  :"]) + "\n)\n"
            + listing_source(book)
            + f"#show: book.with({args})\n\n"
            + body + index_source(book))


def org_line_of(source: str, line: int, column: int | None) -> int | None:
    """The Org line nearest before line:column of the Typst source, from its markers."""
    lines = source.split("\n")
    if not 1 <= line <= len(lines):
        return None
    here = lines[line - 1][: (column or 10**9)]
    found = MARK_RE.findall(here)
    if found:
        return int(found[-1])
    for k in range(line - 2, -1, -1):
        found = MARK_RE.findall(lines[k])
        if found:
            return int(found[-1])
    return None


def explain_typst(org: Path, source: str, text: str, head: int) -> tuple[int | None, str]:
    """A Typst diagnostic, with the Org line its first location in the generated part maps to."""
    for m in re.finditer(r"\.typ:(\d+):(\d+)", text):
        line, col = int(m.group(1)), int(m.group(2))
        if line > head:
            return org_line_of(source, line, col), text
    return None, text


def missing_glyphs(doc: literate.Document) -> list[str]:
    """Warnings for CJK ideographs and emoji that no font of the book has (see pdf/fonts)."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError:
        return []
    sys.path.insert(0, str(FONTS))
    try:
        from subset import is_cjk, is_emoji
    finally:
        sys.path.remove(str(FONTS))
    have: set[int] = set()
    for f in sorted(FONTS.glob("*.[ot]tf")):
        have |= set(TTFont(f, lazy=True).getBestCmap())
    out, seen = [], set()
    for k, line in enumerate(doc.lines):
        for ch in line:
            cp = ord(ch)
            if cp > 0x2E7F and cp not in have and cp not in seen and cp not in (0x200D, 0xFE0F) \
                    and (is_cjk(cp) or is_emoji(cp)):
                seen.add(cp)
                out.append(f"{doc.path.name}:{k + 1}: no font of the book has {ch} (U+{cp:04X}); "
                           "run pdf/fonts/subset.py (see its docstring)")
    return out


def compile_pdf(book: Book, source: str, typ_path: Path | None) -> bytes:
    import typst
    doc = book.doc
    head = TEMPLATE.read_text(encoding="utf-8").count("\n") + 1
    try:
        pdf, warnings = typst.compile_with_warnings(
            source.encode("utf-8"), root=str(doc.path.resolve().parent),
            font_paths=[str(FONTS)], ignore_system_fonts=True, timestamp=0)
    except typst.TypstError as e:
        text = "\n".join(filter(None, [e.diagnostic, *(getattr(e, "trace", None) or [])]))
        line, text = explain_typst(doc.path, source, text, head)
        if typ_path:
            text = re.sub(r"\S*__typst_py_bytes__\.typ", str(typ_path), text)
        raise TangleError(doc.path, line, f"Typst cannot typeset this: {e.message}\n"
                          f"Typst says (about the source it was given, kept in {typ_path}):\n"
                          f"{text.rstrip()}") from None
    for w in warnings or []:
        text = getattr(w, "diagnostic", None) or str(w)
        line, _ = explain_typst(doc.path, source, text, head)
        print(f"{doc.path.name}:{line or '?'}: warning: {getattr(w, 'message', text)}", file=sys.stderr)
    return pdf


def prepare(org: Path) -> tuple[Book, dict, results.Results]:
    """What every edition starts from: the model of the book, pandoc's AST of it (each
    code block marked with its weave-id) and the results. Slow parts (pandoc reading
    the whole file, the cheap results running) are done once here."""
    doc = literate.parse(Path(org))
    outputs = literate.tangle_document(doc)   # the book must tangle: same errors, same lines
    book = book_model(doc)
    check_includes(doc)
    ast = read_org(doc, marked_source(doc))
    shown = set()

    def find_ids(x):
        if isinstance(x, dict):
            if x.get("t") == "CodeBlock" and (id_ := dict(x["c"][0][2]).get("weave-id")):
                shown.add(f"blk-{id_}")
            for v in x.values():
                find_ids(v)
        elif isinstance(x, list):
            for v in x:
                find_ids(v)
    find_ids(ast["blocks"])
    for p in book.pieces:
        p.visible = p.id in shown       # pandoc drops :exports none blocks
    book.identifiers = identifiers(book, outputs)
    book.tested = tested_by.load(doc, outputs)
    book.listing = any(line.strip() == LISTING for line in doc.lines)
    res = results.load(doc)             # cheap results run now, frozen ones are read
    return book, ast, res


def book_source(org: Path, prepared: tuple | None = None) -> tuple[Book, str]:
    """The model of the book and the whole Typst source, in memory."""
    book, ast, res = prepared or prepare(org)
    doc = book.doc
    rewriter = Rewriter(book, ast, res)
    ast["blocks"] = rewriter.run()
    for w in res.warnings + rewriter.warnings + tested_warnings(book) + missing_glyphs(book.doc):
        print(f"warning: {w}", file=sys.stderr)
    return book, typst_source(book, write_typst(doc, ast))


def weave(org: Path, output: Path | None = None, keep_typst: bool = False) -> Path:
    """llm.org -> PDF. Writes no PDF unless everything succeeded, and never half of one."""
    org = Path(org)
    book, source = book_source(org)
    output = Path(output) if output else org.resolve().parent / "pdf" / f"{org.stem}.pdf"
    output.parent.mkdir(parents=True, exist_ok=True)
    typ_path = output.with_suffix(".typ")
    try:
        pdf = compile_pdf(book, source, typ_path)
    except TangleError:
        literate.atomic_write(typ_path, source.encode("utf-8"), 0o644)   # for the diagnostic
        raise
    if keep_typst:
        literate.atomic_write(typ_path, source.encode("utf-8"), 0o644)
    literate.atomic_write(output, pdf, 0o644)
    return output


def main(args) -> int:
    """`tangle.py weave`: args.org, args.output, args.typst."""
    try:
        out = weave(args.org, args.output, args.typst)
    except TangleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
