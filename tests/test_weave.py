"""The weave: llm.org -> PDF. Built on a fixture book that has every construct, and on llm.org."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pypdf
import pytest

import tangle
import weave

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "weave" / "book.org"


def pdf_text(path: Path) -> str:
    text = "\n".join(page.extract_text() for page in pypdf.PdfReader(path).pages)
    return " ".join(text.split())   # lines wrap anywhere: compare with single spaces


def model(org: Path) -> weave.Book:
    doc = tangle.parse(org)
    tangle.resolve(doc)
    return weave.book_model(doc)


def line_of(org: Path, text: str) -> int:
    return next(k + 1 for k, s in enumerate(org.read_text().split("\n")) if text in s)


@pytest.fixture(scope="module")
def fixture_book(tmp_path_factory):
    out = tmp_path_factory.mktemp("weave") / "book.pdf"
    weave.weave(FIXTURE, out, keep_typst=True)
    return out, out.with_suffix(".typ").read_text(), pdf_text(out)


def test_fonts_cover_the_fixture():
    assert weave.missing_glyphs(tangle.parse(FIXTURE)) == []
    doc = tangle.parse(FIXTURE, FIXTURE.read_text() + "\n字\n")
    assert [w.split(" (")[0] for w in weave.missing_glyphs(doc)] == [
        f"book.org:{len(doc.lines) - 1}: no font of the book has 字"]


def test_fixture_pdf_has_every_chapter_and_chunk(fixture_book):
    pdf, _, text = fixture_book
    assert pdf.read_bytes().startswith(b"%PDF-")
    for title in ["Preface", "Part I: Basics", "Counting things", "Tables and figures",
                  "Extra notes", "Contents", "Index of chunks", "Files the book builds"]:
        assert title in text
    for name in ["count loop", "count step", "mean expr"]:
        assert f"⟨{name}⟩" in text
    # Numbering: chapters, sections, appendices, equations, table and figure.
    for label in ["Chapter 1", "Chapter 2", "1.1 The skeleton", "Appendix A", "(1.1)",
                  "Table 1 counts", "figure 1 draws", "Table 1:", "Figure 1:",
                  "→ build/fixture/count.py"]:
        assert label in text
    # Hidden blocks and COMMENT subtrees stay out of the book.
    assert "HIDDEN_CONSTANT" not in text and "DRAFT" not in text
    assert "漢 and 😀" in text


def piece(book: weave.Book, first_line: str) -> weave.Piece:
    return next(p for p in book.pieces if p.block.body and p.block.body[0].startswith(first_line))


def test_cross_references_follow_tangles_model():
    book = model(FIXTURE)
    imports, loop = piece(book, '"""Counting things'), piece(book, "for x in xs:")
    steps = book.chunks["count-step"]
    assert [p.block.body for p in steps] == [["total += x"], ["total %= 1_000_003  # keep it bounded"]]
    # An inherited :tangle (from the chapter's property drawer), invisible to pandoc.
    assert imports.target == "build/fixture/count.py" == imports.block.params.get("tangle")
    # Blocks in COMMENT subtrees are not in the book.
    assert "build/fixture/draft.py" not in book.files
    # The chunk used in two places, by blocks of two files.
    assert [u.target for u in book.users["count-loop"]] == ["build/fixture/count.py",
                                                             "build/fixture/report.py"]
    assert book.users["count-step"] == [loop]
    assert loop.chunk == "count-loop" and loop.target is None


def test_files_list_their_blocks_in_tangles_order():
    book = model(FIXTURE)
    outputs = tangle.tangle_document(tangle.parse(FIXTURE))
    assert sorted(outputs) == sorted(book.files)
    for target, out in outputs.items():
        own = [p.block for p in book.files[target]]
        # Each tangled line's block, if it is one of the file's own (not a chunk pasted in).
        order = [b.line for line in out.lines for b in own if b.line < line.org_line < b.end_line]
        assert list(dict.fromkeys(order)) == [b.line for b in own]


def test_cross_references_in_the_typst_source(fixture_book):
    _, source, _ = fixture_book
    chunks = {m.group(1): m.group(0) for m in re.finditer(r"<(blk-\d+)>\n#chunk\(.*", source)}
    first, second = (f"blk-{line_of(FIXTURE, s) - 1}" for s in ("total += x", "total %= 1_000_003"))
    assert 'name: "count step"' in chunks[first] and f'next: "{second}"' in chunks[first]
    assert "plus: true" in chunks[second] and f'prev: "{first}"' in chunks[second]
    loop = f"blk-{line_of(FIXTURE, 'for x in xs:') - 1}"
    users = re.search(r"used: \((.*?)\),? noweb", chunks[loop]).group(1)
    assert 'raw("build/fixture/count.py")' in users and 'raw("build/fixture/report.py")' in users
    # The file's blocks continue past the :exports none block, which the book does not show.
    hidden = f"blk-{line_of(FIXTURE, 'HIDDEN_CONSTANT') - 1}"
    assert hidden not in chunks and hidden not in source
    mean = f"blk-{line_of(FIXTURE, 'def mean(') - 1}"
    assert f'next: "{mean}"' in chunks[f"blk-{line_of(FIXTURE, 'def count(') - 1}"]
    # References inside code link to the definitions (whole lines and mid-line ones).
    assert '"count-loop": "' + loop + '"' in source and "noweb: chunk-targets" in chunks[mean]
    # Org links became real links; the index lists every chunk and file.
    assert "#link(<counting-things>)" in source and "#ref(label(\"fig-curve\"), supplement: none)" in source
    assert source.count("#index-entry(chunk-name(") == 3
    assert source.count("#index-entry(raw(") == 2


def test_identifier_index(fixture_book):
    _, source, text = fixture_book
    entries = {m.group(1): m.group(0) for m in
               re.finditer(r'#index-entry\(link\(label\("blk-\d+"\), raw\("(\w+)"\)\).*', source)}
    assert sorted(entries) == ["count", "mean", "report"]     # HIDDEN_CONSTANT's block is hidden
    blk = {s: f"blk-{line_of(FIXTURE, s) - 1}" for s in ("def count(", "count(xs) / len",
                                                          "from fixture.count import")}
    # count is defined in its file's block and used by ⟨mean expr⟩ and by the report.
    assert entries["count"] == (
        f'#index-entry(link(label("{blk["def count("]}"), raw("count")), text(size: 0.8em, '
        f'fill: muted, raw("count.py")), [defined #pages-of(("{blk["def count("]}",))], '
        f'[used #pages-of(("{blk["count(xs) / len"]}", "{blk["from fixture.count import"]}",))])')
    assert "[used" not in entries["mean"] + entries["report"]
    assert re.search(r"Index of identifiers .* count count\.py defined \d+ used \d+, \d+ mean", text)


def test_identifier_uses_follow_pythons_scopes():
    tree = ast.parse("from llm.train import main as run\n"
                     "import llm.model\n"
                     "def f(T, cfg):\n"
                     "    GPT = 1\n"
                     "    return T + run() + llm.model.T + cfg.T + GPT + train.main\n"
                     "model = f\n"
                     "print(model.GPT, T)\n")
    modules = {"build.llm.train": "build/llm/train.py", "build.llm.model": "build/llm/model.py"}
    main, T, GPT = ("build/llm/train.py", "main"), ("build/llm/model.py", "T"), ("build/llm/model.py", "GPT")
    # T and GPT inside f are f's own, cfg.T is a field, and `model` below is a variable.
    assert weave.global_uses(tree, None, modules, {main, T, GPT}) == [(main, 5), (T, 5), (main, 5)]
    # In model.py itself, the bare T at the top level is the module's.
    assert weave.global_uses(tree, "build/llm/model.py", modules, {main, T, GPT}) == [
        (main, 5), (T, 5), (main, 5), (T, 7)]


def test_numbered_equation_survives(fixture_book):
    _, source, text = fixture_book
    assert re.search(r"#numbered\[\$ S = sum_\(i = 1\)\^n x_i .*\$ <eq:sum>\]", source)
    assert '#ref(label("eq:sum"), supplement: none)' in source
    assert "(1.1)" in text and "(1.2)" in text      # \begin{equation} and \begin{align}
    assert "(1.3)" not in text                       # \[ \] is not numbered


def test_two_builds_are_identical(fixture_book, tmp_path):
    pdf, _, _ = fixture_book
    again = tmp_path / "again.pdf"
    subprocess.run([sys.executable, str(ROOT / "tangle.py"), "weave", str(FIXTURE), "-o", str(again)],
                   check=True, capture_output=True)
    assert again.read_bytes() == pdf.read_bytes()


def broken_copy(tmp_path: Path, old: str, new: str) -> Path:
    folder = tmp_path / "book"
    shutil.copytree(FIXTURE.parent, folder)
    org = folder / "book.org"
    org.write_text(org.read_text().replace(old, new, 1))
    return org


@pytest.mark.parametrize("old, new, line_text, message", [
    ("[[*Counting things]]", "[[*No such chapter]]", "No such chapter", "no heading titled"),
    ("\\[ \\bar x = \\frac{S}{n} . \\]", "\\[ \\bar x = \\frac{S}{n . \\]", "\\bar x", "cannot turn this math"),
    ("[[file:curve.png]]", "[[file:missing.png]]", "missing.png", "not found"),
    ("    <<count-step>>", "    <<count-stpe>>", "count-stpe", "unknown noweb reference"),
])
def test_broken_document_names_the_line_and_keeps_the_pdf(tmp_path, capsys, old, new, line_text, message):
    org = broken_copy(tmp_path, old, new)
    pdf = tmp_path / "book.pdf"
    pdf.write_bytes(b"the previous book")
    assert tangle.main(["weave", str(org), "-o", str(pdf)]) == 1
    err = capsys.readouterr().err
    assert f"book.org:{line_of(org, line_text)}:" in err and message in err
    assert pdf.read_bytes() == b"the previous book"


def test_typst_error_prints_diagnostic_and_org_line(tmp_path, capsys):
    org = broken_copy(tmp_path, "x", "x")
    (org.parent / "curve.png").write_bytes(b"not a png")
    pdf = tmp_path / "book.pdf"
    assert tangle.main(["weave", str(org), "-o", str(pdf)]) == 1
    err = capsys.readouterr().err
    assert f"book.org:{line_of(org, 'curve.png')}: Typst cannot typeset this" in err
    assert "failed to decode image" in err and "│" in err      # Typst's own diagnostic
    assert not pdf.exists() and not list(tmp_path.glob("*.pdf.*"))


def test_the_real_book(tmp_path, llm_book):
    """llm.org weaves; every chapter is a heading of the PDF and the index names every chunk."""
    org = ROOT / "llm.org"
    book, source = weave.book_source(org, llm_book())
    out = tmp_path / "llm.pdf"
    out.write_bytes(weave.compile_pdf(book, source, None))
    reader = pypdf.PdfReader(out)

    def flat(items):
        for item in items:
            yield from flat(item) if isinstance(item, list) else [item]
    # PDF bookmarks, without their numbers ("2.1 The idea" -> "The idea", "A The literate tools").
    bookmarks = {re.sub(r"^(\d+|[A-Z])(\.\d+)* ", "", item.title): reader.get_destination_page_number(item)
                 for item in flat(reader.outline)}
    chapters = [h.title for h in tangle.parse(org).headings if h.level <= 2 and not h.commented]
    assert chapters and all(" ".join(t.split()) in bookmarks for t in chapters)
    # pypdf reads about five pages a second: read the index, not the whole book.
    index = range(bookmarks["Index of chunks"], bookmarks["Files the book builds"] + 1)
    text = " ".join(" ".join(reader.pages[k].extract_text().split()) for k in index)
    shown = [name for name, pieces in book.chunks.items() if any(p.visible for p in pieces)]
    assert shown    # the preface's ⟨cli commands⟩ at least
    for name in shown:
        assert f"⟨{weave.display_name(name)}⟩" in text
    # The identifier index, the book's last pages, names every top-level name of the code.
    index = range(bookmarks["Index of identifiers"], len(reader.pages))
    text = " ".join(" ".join(reader.pages[k].extract_text().split()) for k in index)
    assert len(book.identifiers) > 300 and {"GPT", "generate", "PRESETS"} <= {i.name for i in book.identifiers}
    for ident in book.identifiers:
        assert f"{ident.name} {Path(ident.file).name} defined" in text


def test_a_link_over_a_line_break_becomes_one_link():
    lines = ["Timed in [[*How fast", "is it?]] below.", "#+begin_src python",
             "x = [[1,", " 2]]", "#+end_src", "See [[*The", "data]]", "then more."]
    assert weave.join_split_links(lines) == [
        "Timed in [[*How fast is it?]]", "below.", "#+begin_src python",
        "x = [[1,", " 2]]", "#+end_src", "See", "[[*The data]]", "then more."]
