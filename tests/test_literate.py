"""The literate tools under bad input (issue 13, items 7-12): refuse, name the line, write nothing."""
import ast
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import literate
import tangle
from conftest import ROOT

GOOD = """
    #+PROPERTY: header-args:python :mkdirp yes
    #+begin_src python :tangle build/a.py
    a = 1
    #+end_src

    Some prose between the blocks.

    #+begin_src python :tangle build/b.py
    b = 2
    #+end_src
    """


def write(folder: Path, org: str, name: str = "doc.org") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(org).lstrip("\n"))
    return path


def tree(folder: Path) -> dict[str, bytes]:
    """Every file and folder under `folder` with its bytes (None for a folder) and mode."""
    return {p.relative_to(folder).as_posix():
            (None if p.is_dir() else p.read_bytes(), p.stat().st_mode & 0o777)
            for p in sorted(folder.rglob("*"))}


def line_of(org: Path, text: str, nth: int = 1) -> int:
    hits = [k for k, s in enumerate(org.read_text().split("\n"), 1) if text in s]
    return hits[nth - 1]


def refused(tmp_path: Path, capsys, org_text: str, *args: str) -> tuple[str, Path]:
    """Tangle GOOD, then org_text: it must fail with one line and leave every file as it was."""
    org = write(tmp_path, GOOD)
    assert tangle.main([str(org)]) == 0
    org = write(tmp_path, org_text)
    before = tree(tmp_path)
    capsys.readouterr()
    assert tangle.main([*args, str(org)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert tree(tmp_path) == before
    return err, org


# --- 7. Tangled Python must compile; an emptied book must not delete build/ -----------------

def test_duplicated_begin_src_names_the_line(tmp_path, capsys):
    """Org would tangle the second line as code (a Python comment: it even compiles)."""
    text = GOOD.replace("    #+begin_src python :tangle build/b.py\n",
                        "    #+begin_src python :tangle build/b.py\n" * 2)
    err, org = refused(tmp_path, capsys, text)
    first = line_of(org, '#+begin_src python :tangle build/b.py')
    assert f"doc.org:{first + 1}: #+begin_src inside the block of line {first}" in err


def test_deleted_end_src_pulls_prose_into_code(tmp_path, capsys):
    text = GOOD.replace("    a = 1\n    #+end_src\n", "    a = 1\n", 1)
    err, org = refused(tmp_path, capsys, text)
    assert "doc.org:7: #+begin_src inside the block of line 2 (is its #+end_src missing?)" in err


def test_swapped_begin_and_end(tmp_path, capsys):
    lines = textwrap.dedent(GOOD).lstrip("\n").split("\n")
    k, j = lines.index("#+end_src"), lines.index("#+begin_src python :tangle build/b.py")
    lines[k], lines[j] = lines[j], lines[k]            # the first block ends where b begins
    err, org = refused(tmp_path, capsys, "\n".join(lines))
    assert f"doc.org:{k + 1}: #+begin_src inside the block of line 2" in err


def test_syntax_error_in_a_chunk_names_its_org_line(tmp_path, capsys):
    err, org = refused(tmp_path, capsys, GOOD + """
    #+begin_src python :tangle build/c.py :noweb yes
    def f():
        <<body>>
    #+end_src
    #+name: body
    #+begin_src python
    x = 1
    return x +
    #+end_src
    """)
    assert f"doc.org:{line_of(org, 'return x +')}: build/c.py:3 would not compile" in err
    assert "⟨body⟩" in err


def test_empty_org_keeps_build_unless_allowed(tmp_path, capsys):
    err, org = refused(tmp_path, capsys, "")
    assert "--allow-empty" in err and "build/a.py" in err
    assert tangle.main(["--allow-empty", str(org)]) == 0
    assert not (tmp_path / "build/a.py").exists() and not (tmp_path / "build/b.py").exists()


def test_a_new_book_with_no_code_is_fine(tmp_path):
    assert tangle.main([str(write(tmp_path, "* Just prose\n"))]) == 0


# --- 8. Every target is checked before any file is written ------------------------------------

BAD_TARGETS = {
    "dot": (":tangle .", "names a folder"),
    "folder": (":tangle tests", "is a folder"),
    "trailing slash": (":tangle build/new/", "names a folder"),
    "under a file": (":tangle notes/x.py", "notes is a file, not a folder"),
    "case twin": (":tangle build/B.py", "only in letter case"),
    "file vs folder": (":tangle build/b.py/x.py :mkdirp yes", "which line 8 tangles as a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_target_writes_nothing(case, tmp_path, capsys):
    (tmp_path / "tests").mkdir()
    (tmp_path / "notes").write_text("a file\n")
    header, message = BAD_TARGETS[case]
    # The first block changes, so a write phase that is not all-or-nothing would show.
    text = GOOD.replace("a = 1", "a = 'changed'") + f"""
    #+begin_src python {header}
    bad = True
    #+end_src
    """
    err, org = refused(tmp_path, capsys, text)
    assert f"doc.org:{line_of(org, header)}: " in err and message in err, err


def test_failed_write_leaves_every_file(tmp_path, capsys, monkeypatch):
    """A full disk on the second file: the first is not replaced, no temp or folder is left."""
    org = write(tmp_path, GOOD)
    assert tangle.main([str(org)]) == 0
    write(tmp_path, GOOD.replace("a = 1", "a = 10").replace("b = 2", "b = 20")
          .replace("build/b.py", "build/new/b.py"))
    before = tree(tmp_path)
    calls = []
    real = literate.write_temp

    def full_disk(path, data, mode):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, data, mode)
    monkeypatch.setattr(literate, "write_temp", full_disk)
    capsys.readouterr()
    assert tangle.main([str(org)]) == 1
    assert "No space left on device; nothing was changed" in capsys.readouterr().err
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k != "doc.org"} == \
        {k: v for k, v in before.items() if k != "doc.org"}


# --- 9. Files tangle never writes or removes ----------------------------------------------------

PROTECTED = {
    "git hook": (":tangle .git/hooks/pre-commit :shebang #!/bin/sh :mkdirp yes", "inside .git/"),
    "org file": (":tangle doc.org", "would overwrite the Org file"),
    "org file, other case": (":tangle DOC.ORG", "would overwrite the Org file"),
    "tangle.py": (":tangle tangle.py", "one of the literate tools"),
    "weave.py": (":tangle Weave.py", "one of the literate tools"),
    "results.py": (":tangle results.py", "one of the literate tools"),
    "literate.py": (":tangle literate.py", "one of the literate tools"),
    "manifest": (":tangle .doc.tangle.json", "manifest"),
}


@pytest.mark.parametrize("case", sorted(PROTECTED))
def test_protected_targets(case, tmp_path, capsys):
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    header, message = PROTECTED[case]
    text = GOOD + f"""
    #+begin_src python {header}
    x = 1
    #+end_src
    """
    err, org = refused(tmp_path, capsys, text)
    assert f"doc.org:{line_of(org, header)}: " in err and message in err, err


def test_makefile_only_when_the_block_names_it(tmp_path, capsys):
    inherited = """
        * Build
        :PROPERTIES:
        :header-args: :tangle Makefile
        :END:
        #+begin_src makefile
        all:
        #+end_src
        """
    err, org = refused(tmp_path, capsys, inherited)
    assert f"doc.org:{line_of(org, '#+begin_src makefile')}: :tangle Makefile is inherited" in err
    org = write(tmp_path, "#+begin_src makefile :tangle Makefile\nall:\n#+end_src\n")
    assert tangle.main(["--allow-empty", str(org)]) == 0
    assert (tmp_path / "Makefile").read_text() == "all:\n"


@pytest.mark.parametrize("entry", ["../outside/x", "/abs/x", "doc.org", ".git/config", "build"])
def test_manifest_entries_are_checked_before_anything_is_removed(entry, tmp_path, capsys):
    book = tmp_path / "book"
    book.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_text("a user's file\n")
    (book / ".git").mkdir()
    (book / ".git" / "config").write_text("[core]\n")
    org = write(book, GOOD)
    assert tangle.main([str(org)]) == 0
    manifest = book / ".doc.tangle.json"
    data = json.loads(manifest.read_text())
    data["files"][entry] = {"sha256": "", "map": []}
    manifest.write_text(json.dumps(data))
    write(book, GOOD.replace("b = 2", "b = 3"))
    before = tree(tmp_path)
    capsys.readouterr()
    assert tangle.main([str(org)]) == 1
    err = capsys.readouterr().err
    assert ".doc.tangle.json: lists" in err and "Nothing was removed" in err, err
    assert tree(tmp_path) == before
    assert tangle.main(["--check", str(org)]) == 1      # --check reads the manifest too


# --- 10. The weave includes only files inside the book's folder ---------------------------------

@pytest.mark.parametrize("include, message", [
    ('"/etc/hostname"', "only files inside"),
    ('"../secret.org"', "only files inside"),
    ('"~/secret.org"', "only files inside"),
    ('"link/secret.org"', "through a symlink"),
    ('"sub/nested.org"', "(line 1 of sub/nested.org): only files inside"),
    ('"missing.org"', "not found"),
])
def test_weave_include_is_confined(include, message, tmp_path):
    weave = pytest.importorskip("weave")
    book = tmp_path / "book"
    (book / "sub").mkdir(parents=True)
    (tmp_path / "secret.org").write_text("a secret\n")
    (book / "link").symlink_to(tmp_path)
    (book / "sub" / "nested.org").write_text('#+INCLUDE: "../../secret.org"\n')
    org = write(book, f"* Chapter\nText.\n\n#+INCLUDE: {include}\n")
    with pytest.raises(tangle.TangleError) as e:
        weave.weave(org, tmp_path / "out.pdf")
    assert str(e.value).startswith("doc.org:4: ") and message in str(e.value), e.value
    assert not (tmp_path / "out.pdf").exists()


def test_weave_include_inside_the_folder_is_read_from_there(tmp_path):
    weave = pytest.importorskip("weave")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.org").write_text('#+INCLUDE: "b.org"\n')
    (tmp_path / "sub" / "b.org").write_text("included text\n")
    org = write(tmp_path, '* Chapter\n#+INCLUDE: "sub/a.org"\n#+begin_src org\n'
                '#+INCLUDE: "/etc/hostname"\n#+end_src\n')
    doc = literate.parse(org)
    weave.check_includes(doc)          # the one inside a source block is code, not an include


# --- 11. Long lines cost linear time -------------------------------------------------------------

HUGE = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import literate, tangle, weave, results
org = Path(sys.argv[1])
t0 = time.process_time()     # CPU time: the machine may be busy
assert tangle.main([str(org)]) == 0
assert tangle.main(["--check", str(org)]) == 0
assert tangle.main(["where", "--org", str(org), str(org.parent / "out.py:2")]) == 0
doc = literate.parse(org)
literate.resolve(doc)
book = weave.book_model(doc)
weave.marked_source(doc)
weave.check_includes(doc)
results.citations(doc)
print(f"{time.process_time() - t0:.2f}")
"""


def test_two_megabyte_lines_are_linear(tmp_path):
    n = 2_000_000
    code = "s = '" + "<<a><" * (n // 5) + "'"           # a `<<` every 5 characters, no `>>`
    heading = "* T" + " " * n + "x"                    # a run of blanks, then text
    prose = "[[result:" + "a" * n                      # an unfinished link
    keyword = "#+name:" + " " * n + "x"
    org = write(tmp_path, f"""
        {heading}
        {prose}
        {keyword}
        #+begin_src python :tangle out.py :noweb yes
        x = 1
        {code}
        y = "<<b>>"
        #+end_src
        #+name: b
        #+begin_src python
        2
        #+end_src
        """)
    run = subprocess.run([sys.executable, "-c", HUGE, str(org), str(ROOT)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 10          # quadratic: hours; linear: < 1 s
    assert (tmp_path / "out.py").read_text().endswith('y = "2"\n')


def test_noweb_refs_match_orgs_regexp():
    rng = random.Random(13)
    for _ in range(20_000):
        text = "".join(rng.choice("<<>> \tab") for _ in range(rng.randint(0, 14)))
        expected = [(m.start(2), m.end(2), m.group(3)) for m in literate.NOWEB_REF.finditer(text)]
        assert literate.noweb_refs(text) == expected, text


# --- 12. The tools import one way ------------------------------------------------------------

TOOLS = ["literate", "tangle", "weave", "results", "web", "notebooks"]


def test_tools_import_one_way():
    """No cycle, even counting imports inside functions; the core imports none of the tools."""
    graph = {}
    for name in TOOLS:
        tree_ = ast.parse((ROOT / f"{name}.py").read_text())
        mods = {a.name for n in ast.walk(tree_) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree_) if isinstance(n, ast.ImportFrom)}
        graph[name] = sorted(mods & set(TOOLS) - {name})
    assert graph["literate"] == []

    def reaches(a, b, seen=()):
        return any(c == b or (c not in seen and reaches(c, b, seen + (c,))) for c in graph[a])
    assert not [n for n in TOOLS if reaches(n, n)], graph
    loaded = subprocess.run([sys.executable, "-c", "import sys, tangle; print(sorted(set(sys.modules)"
                             f" & {set(TOOLS)!r}))"], cwd=ROOT, capture_output=True, text=True)
    assert loaded.stdout.strip() == "['literate', 'tangle']", loaded.stderr


# --- One-line errors -----------------------------------------------------------------------------

def test_a_folder_as_the_org_file(tmp_path, capsys):
    (tmp_path / "build").mkdir()
    assert tangle.main([str(tmp_path / "build")]) == 1
    assert capsys.readouterr().err == "error: build: is a folder, not an Org file; name the Org " \
        "file (for example llm.org)\n"


@pytest.mark.parametrize("text, line, message", [
    ("#+begin_src python :tangle out.py :\nx = 1\n#+end_src\n", 1, "a ':' without a name"),
    ("* H\n:PROPERTIES:\n:header-args: :tangle out.py :\n:END:\n#+begin_src python\n#+end_src\n",
     5, "a ':' without a name"),
    ("#+begin_src python :tangle out.py\r\nx = 1\r\n#+end_src\r\n", 1, "CR LF"),
    ("#+begin_src python :tangle " + "d/" * 3000 + "x.py :mkdirp yes\n#+end_src\n", 1,
     "not a usable file name"),
    ("#+begin_src python :tangle out.py\nx = '\0'\n#+end_src\n", 2, "would not compile"),
])
def test_one_line_errors(text, line, message, tmp_path, capsys):
    org = tmp_path / "doc.org"
    org.write_bytes(text.encode())
    assert tangle.main([str(org)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: doc.org:{line}: ") and message in err and err.count("\n") == 1, err
    assert len(err) < 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.org"]
