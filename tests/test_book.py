"""The book keeps its promises: outputs are computed, citations have entries, math typesets."""
import re
from pathlib import Path

import pytest

import results
import tangle
import weave

ROOT = Path(__file__).resolve().parents[1]
ORG = ROOT / "llm.org"
BIB = ROOT / "pdf" / "references.bib"

# [cite:@key], [cite/t:@a;@b], [cite:see @key p. 3]: Org's citation syntax, as pandoc reads it.
CITATION = re.compile(r"\[cite(?:/[\w/]+)?:([^\]]*)\]")
CITE_KEY = re.compile(r"@([\w:.+-]*\w)")
BIB_ENTRY = re.compile(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", re.M)


def cited_keys(text: str) -> dict[str, int]:
    """Every key the text cites, with the first line that cites it."""
    keys: dict[str, int] = {}
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for key in CITE_KEY.findall(m.group(1)):
            keys.setdefault(key, line)
    return keys


def bib_keys(text: str) -> list[str]:
    return [key for kind, key in BIB_ENTRY.findall(text) if kind.lower() not in ("comment", "string")]


def citation_problems(org_text: str, bib_text: str) -> list[str]:
    """A citation whose key has no entry, and an entry key given twice."""
    entries = bib_keys(bib_text)
    problems = [f"llm.org:{line}: [cite:@{key}] has no entry in pdf/references.bib"
                for key, line in cited_keys(org_text).items() if key not in entries]
    problems += [f"pdf/references.bib: the key {key} is defined twice"
                 for key in sorted({k for k in entries if entries.count(k) > 1})]
    return problems


def test_every_citation_has_an_entry():
    text = ORG.read_text(encoding="utf-8")
    assert len(cited_keys(text)) >= 20
    assert citation_problems(text, BIB.read_text(encoding="utf-8")) == []


def test_a_citation_without_an_entry_fails():
    bib = "@article{known2020,\n  title = {A},\n  year = {2020}\n}\n"
    assert citation_problems("As shown [cite:@known2020].", bib) == []
    assert citation_problems("Line one.\nAs [cite/t:@known2020;@missing2021] show.", bib) == [
        "llm.org:2: [cite:@missing2021] has no entry in pdf/references.bib"]
    assert citation_problems("", bib + bib) == ["pdf/references.bib: the key known2020 is defined twice"]


def test_the_book_prints_its_bibliography():
    text = ORG.read_text(encoding="utf-8")
    assert "#+BIBLIOGRAPHY: pdf/references.bib" in text
    assert '#bibliography("/pdf/references.bib"' in text


def test_every_entry_typesets():
    """Typst reads every entry and formats a citation of it (a malformed entry is an error)."""
    import typst
    keys = bib_keys(BIB.read_text(encoding="utf-8"))
    source = " ".join(f"@{k}" for k in keys) + '\n#bibliography("/pdf/references.bib", style: "apa")\n'
    pdf = typst.compile(source.encode("utf-8"), root=str(ROOT))
    assert pdf.startswith(b"%PDF")


def test_no_output_is_pasted_after_code():
    """What a code block prints or makes is a result: no example or table right after one."""
    lines = ORG.read_text(encoding="utf-8").split("\n")
    pasted = []
    for k, line in enumerate(lines):
        if line.strip().lower() != "#+end_src":
            continue
        j = k + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j < len(lines) and (lines[j].strip().lower().startswith("#+begin_example")
                               or lines[j].lstrip().startswith("|")):
            pasted.append(f"llm.org:{j + 1}")
    assert pasted == []


def test_result_blocks_are_not_chunks():
    """A result block's #+name is cited by the prose; the chunk index does not list it."""
    doc = tangle.parse(ORG)
    tangle.resolve(doc)
    book = weave.book_model(doc)
    names = set(results.specs_of(doc))
    assert names and not names & set(book.chunks)


def test_thousands_in_math_use_braced_commas():
    """7{,}087 in math: a bare comma between digits would be typeset as punctuation."""
    text = ORG.read_text(encoding="utf-8")
    math = re.findall(r"(?<![\\$])\$([^$\n]+)\$", text) + re.findall(r"(?<!\\)\\\[(.*?)\\\]", text, re.S)
    assert [m for m in math if re.search(r"\d,\d{3}\b", m)] == []
    assert weave.grouped_digits(r"d = 7{,}087{,}872, (a, b)") == r"d = \text{7,087,872}, (a, b)"


def test_results_output_is_what_the_block_prints(tmp_path):
    org = tmp_path / "book.org"
    org.write_text("* A\n\n#+name: r-printed\n#+begin_src python :results output\n"
                   "print('two', 1 + 1)\n#+end_src\n\n[[result:r-printed]]\n\n"
                   "#+name: r-both\n#+begin_src python :results output\n"
                   "print('shown')\nresult = {'n': 3}\n#+end_src\n\n"
                   "It is [[result:r-both.n][3]].\n")
    doc = tangle.parse(org)
    tangle.resolve(doc)
    res = results.load(doc)
    assert res.values == {"r-printed": "two 2\n", "r-both": {"n": 3, "output": "shown\n"}}
    assert results.check(res) == []


# ---------------------------------------------------------------------------
# Code fits the page. A code line wider than the block wraps in the PDF with no mark, so
# the source keeps every printed code line within what the page holds at the code font.

TYPST = ROOT / "pdf" / "book.typ"
BEGIN_EXAMPLE = re.compile(r"^[ \t]*#\+begin_example\b", re.I)
END_EXAMPLE = re.compile(r"^[ \t]*#\+end_example\b", re.I)
code_columns = weave.code_columns       # the weave wraps computed output at the same width
columns = weave.columns


def wide_code_lines(org_text: str, limit: int) -> list[str]:
    """Each printed code line wider than limit: source blocks the book shows (not
    :exports none, not under a COMMENT heading) and example blocks, as llm.org:LINE."""
    doc = tangle.parse(ORG, org_text)
    tangle.resolve(doc)
    wide = []
    for b in doc.blocks:
        if b.params.get("exports") == "none" or (b.heading and b.heading.commented):
            continue
        wide += [(b.line + 1 + k, columns(line)) for k, line in enumerate(b.body)]
    lines = doc.lines
    k = 0
    while k < len(lines):
        if BEGIN_EXAMPLE.match(lines[k]):
            k += 1
            while k < len(lines) and not END_EXAMPLE.match(lines[k]):
                wide.append((k + 1, columns(lines[k])))
                k += 1
        k += 1
    return [f"llm.org:{line}: {n} characters, the page holds {limit}"
            for line, n in sorted(wide) if n > limit]


def test_code_columns_follow_the_book_typography():
    """A4 less 2 x 2.3 cm, less 2 x 7 pt of inset: 450.9 pt over 0.602 x 7.6 pt = 98.5.
    (Measured: a woven 98-character line fits the block, a 99-character one wraps.)"""
    assert code_columns(TYPST.read_text(encoding="utf-8")) == 98
    smaller = TYPST.read_text(encoding="utf-8").replace("code-size = 7.6pt", "code-size = 9pt")
    assert code_columns(smaller) == 83


def test_every_code_line_fits_the_page():
    limit = code_columns(TYPST.read_text(encoding="utf-8"))
    assert wide_code_lines(ORG.read_text(encoding="utf-8"), limit) == []


def test_a_wide_code_line_fails():
    long = "x = " + "1 + " * 10 + "1"                    # 45 characters
    text = ("* A\n\n#+begin_src python :tangle no\nshort = 1\n" + long + "\n#+end_src\n\n"
            "#+begin_src python :tangle no :exports none\n" + long + "\n#+end_src\n\n"
            "#+begin_example\n" + long + "\n#+end_example\n\n"
            "* COMMENT B\n\n#+begin_src python :tangle no\n" + long + "\n#+end_src\n")
    assert wide_code_lines(text, 44) == ["llm.org:5: 45 characters, the page holds 44",
                                         "llm.org:13: 45 characters, the page holds 44"]
    assert wide_code_lines(text, 45) == []
    assert columns("a\tb") == 9 and columns("日本") == 4


def placed_texts(res: results.Results) -> dict[str, str]:
    """Each multi-line text result the book places alone in a paragraph (a verbatim block)."""
    lines = res.doc.lines
    out = {}
    for c in results.citations(res.doc):
        if lines[c.line - 1].strip() != f"[[result:{c.ref}]]":
            continue
        value = results.lookup(res, c.ref)
        if isinstance(value, str) and "\n" in value:
            out[f"llm.org:{c.line} [[result:{c.ref}]]"] = value
    return out


def test_every_computed_output_fits_the_page():
    """What a command printed is wrapped by the weave with a visible mark, never by the
    typesetter: every line of every placed output, as the weave prints it, fits."""
    doc = tangle.parse(ORG)
    tangle.resolve(doc)
    res = results.load(doc)
    limit = code_columns(TYPST.read_text(encoding="utf-8"))
    texts = placed_texts(res)
    assert len(texts) >= 10
    wrapped, wide = 0, []
    for where, text in texts.items():
        printed = weave.wrap_output(text.rstrip("\n"), limit).split("\n")
        wrapped += sum(1 for line in printed if line.startswith(weave.CONTINUED))
        wide += [f"{where}: {columns(line)} characters" for line in printed if columns(line) > limit]
        # Nothing is lost: the marks and the breaks taken out, the text is what was printed.
        assert "".join("".join(line.removeprefix(weave.CONTINUED) for line in printed).split()) \
            == "".join(text.split())
    assert wide == []
    assert wrapped >= 9         # the prepare messages, the FLOP table, a BPE line, a JSON file


def test_wrapped_output_marks_every_continuation():
    text = "alpha beta gamma delta\nshort\n" + "x" * 25
    assert weave.wrap_output(text, 12).split("\n") == [
        "alpha beta", "↪ gamma", "↪ delta", "short", "x" * 12, "↪ " + "x" * 10, "↪ xxx"]
    assert weave.wrap_output("日本語のテキスト", 8) == "日本語の\n↪ テキス\n↪ ト"
    assert weave.wrap_output("fits exactly", 12) == "fits exactly"
