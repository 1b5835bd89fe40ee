"""The literate tool: parsing, header arguments, noweb, errors, atomic writes, drift check."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tangle
from conftest import ROOT, book_frames

FIXTURES = ROOT / "tests" / "fixtures" / "tangle"


def run(tmp: Path, org: str, *args: str, name: str = "doc.org") -> int:
    path = tmp / name
    path.write_text(textwrap.dedent(org).lstrip("\n"))
    return tangle.main([*args, str(path)])


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder (the manifest too) with its bytes, to compare before/after."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read(tmp: Path, rel: str) -> str:
    return (tmp / rel).read_text()


# --- Rules checked against Emacs: fixtures made by tests/fixtures/tangle/regen.sh -------------

def fixture_cases():
    return sorted(p.parent.name for p in FIXTURES.glob("*/input.org"))


# Where Org is silent and this tool refuses on purpose: case -> the error it gives instead.
REFUSED = {
    "noweb-missing-ref": "unknown noweb reference",         # Org inserts nothing
    "comment-heading-named-ref": "unknown noweb reference",  # the block is in a COMMENT subtree
    "noweb-one-char-name-quirk": "unknown noweb reference",  # Org reads the name `a>> + <<b`
    "noweb-child-tangle": "unexpanded",                      # Org leaves the child's <<leaf>>
    "noweb-name-vs-ref": "is also the #+name",               # Org ignores the :noweb-ref blocks
    "noweb-name-vs-ref-name-first": "is also the #+name",
}


@pytest.mark.parametrize("case", fixture_cases())
def test_same_files_as_emacs(case, tmp_path, capsys):
    """Each fixture tangles to exactly what Emacs org-babel-tangle wrote (trailing blanks aside)."""
    src = FIXTURES / case
    shutil.copy(src / "input.org", tmp_path / "input.org")
    # Some fixtures' .py files are fragments, not Python: Emacs does not compile them either.
    if case in REFUSED:
        assert tangle.main(["--no-compile-check", str(tmp_path / "input.org")]) == 1
        err = capsys.readouterr().err
        assert "input.org:" in err and REFUSED[case] in err, err
        assert sorted(tree(tmp_path)) == ["input.org"]
        return
    assert tangle.main(["--no-compile-check", str(tmp_path / "input.org")]) == 0
    expected = {rel: data for rel, data in tree(src / "expected").items()}
    got = {rel: data for rel, data in tree(tmp_path).items()
           if rel not in ("input.org", ".input.tangle.json")}
    assert sorted(got) == sorted(expected)

    def strip(b: bytes) -> list[str]:
        return [line.rstrip() for line in b.decode().rstrip("\n").split("\n")]

    for rel in expected:
        assert strip(got[rel]) == strip(expected[rel]), rel
    modes = src / "modes.txt"
    if modes.exists():
        for line in modes.read_text().split("\n"):
            if line.strip():
                rel, mode = line.split()
                assert oct((tmp_path / rel).stat().st_mode & 0o777) == oct(int(mode, 8)), rel


# --- Header arguments ----------------------------------------------------------------------

def test_inheritance_and_precedence(tmp_path):
    assert run(tmp_path, """
        #+PROPERTY: header-args:python :tangle out/a.py :mkdirp yes
        * One
        #+begin_src python
        one = 1
        #+end_src
        * Two
        :PROPERTIES:
        :header-args:python+: :tangle out/b.py
        :END:
        ** Deeper
        #+BEGIN_SRC python
        two = 2
        #+END_SRC
        #+header: :tangle out/c.py
        #+begin_src python :tangle out/never.py
        three = 3
        #+end_src
        """) == 0
    assert read(tmp_path, "out/a.py") == "one = 1\n"
    assert read(tmp_path, "out/b.py") == "two = 2\n"
    # Org merges #+header lines after the #+begin_src line: the header wins.
    assert read(tmp_path, "out/c.py") == "three = 3\n"
    assert not (tmp_path / "out/never.py").exists()


def test_plain_property_stops_inheritance(tmp_path):
    assert run(tmp_path, """
        #+PROPERTY: header-args:python :tangle top.py :padline no
        * Parent
        :PROPERTIES:
        :header-args:python: :tangle parent.py
        :END:
        ** Child
        #+begin_src python
        x = 1
        #+end_src
        #+begin_src python
        y = 2
        #+end_src
        """) == 0
    # The parent's plain value replaces the file-level one, :padline no included.
    assert read(tmp_path, "parent.py") == "x = 1\n\ny = 2\n"
    assert not (tmp_path / "top.py").exists()


def test_padline_shebang_mkdirp(tmp_path):
    assert run(tmp_path, """
        * Script
        :PROPERTIES:
        :header-args: :tangle out/run.py :mkdirp yes
        :END:
        #+begin_src python :shebang "#!/usr/bin/env python3"
        import sys
        #+end_src
        #+begin_src python
        print(sys.argv)
        #+end_src
        #+begin_src python :padline no
        print("done")
        #+end_src
        """) == 0
    assert read(tmp_path, "out/run.py") == (
        "#!/usr/bin/env python3\nimport sys\n\nprint(sys.argv)\nprint(\"done\")\n")
    assert (tmp_path / "out/run.py").stat().st_mode & 0o777 == 0o755


def test_tangle_yes_names_file_after_org(tmp_path):
    assert run(tmp_path, """
        #+begin_src python :tangle yes
        x = 1
        #+end_src
        """, name="notes.org") == 0
    assert read(tmp_path, "notes.py") == "x = 1\n"


def test_comment_subtree_escapes_and_indentation(tmp_path):
    assert run(tmp_path, """
        #+PROPERTY: header-args :tangle out.py
        * COMMENT Skipped
        #+begin_src python
        skipped = True
        #+end_src
        ** Also skipped
        #+begin_src python
        also = True
        #+end_src
        * Kept
        - a list item:
          #+begin_src python

            doc = '''
            ,* a star line
            ,#+ and a keyword line
            '''
              indented = 1

          #+end_src
        """, "--no-compile-check") == 0   # `  indented = 1` is Org's rule, not Python
    assert read(tmp_path, "out.py") == (
        "doc = '''\n* a star line\n#+ and a keyword line\n'''\n  indented = 1\n")


# --- Noweb ----------------------------------------------------------------------------------

def test_noweb_prefix_suffix_recursion_and_refs(tmp_path):
    assert run(tmp_path, """
        #+PROPERTY: header-args:python :noweb yes
        #+begin_src python :tangle out.py
        def f():
            <<body>>
        print(<<args>>)  # done
        #+end_src
        #+name: body
        #+begin_src python
        x = 1
        <<more>>
        #+end_src
        #+begin_src python :noweb-ref more
        y = 2
        #+end_src
        #+begin_src python :noweb-ref more
        return x + y
        #+end_src
        #+name: args
        #+begin_src python
        1,
        2
        #+end_src
        """, "--no-compile-check") == 0   # Org's prefix rule makes `print(1,` here
    assert read(tmp_path, "out.py") == (
        "def f():\n    x = 1\n    y = 2\n    return x + y\nprint(1,\nprint(2)  # done\n")  # the prefix repeats, as in Org


def test_noweb_no_leaves_references(tmp_path):
    assert run(tmp_path, """
        #+begin_src python :tangle out.py
        a = b <<c>> d
        #+end_src
        """) == 0
    assert read(tmp_path, "out.py") == "a = b <<c>> d\n"


# --- Errors: file:line, and nothing written -------------------------------------------------

ERRORS = {
    "unknown reference": ("""
        #+begin_src python :tangle out.py :noweb yes
        <<missing>>
        #+end_src
        """, 2, "unknown noweb reference <<missing>>"),
    "cycle": ("""
        #+name: a
        #+begin_src python :noweb yes
        <<b>>
        #+end_src
        #+name: b
        #+begin_src python :noweb yes
        <<a>>
        #+end_src
        #+begin_src python :tangle out.py :noweb yes
        <<a>>
        #+end_src
        """, 7, "cycle: a -> b -> a"),
    "unterminated": ("""
        text
        #+begin_src python :tangle out.py
        x = 1
        """, 2, "without #+end_src"),
    "duplicate name": ("""
        #+name: x
        #+begin_src python
        #+end_src
        #+name: x
        #+begin_src python
        #+end_src
        """, 4, "duplicate #+name: x (first at line 1)"),
    "absolute target": ("""
        #+begin_src python :tangle /tmp/evil.py
        #+end_src
        """, 1, "absolute paths are refused"),
    "dotdot target": ("""
        #+begin_src python :tangle ../evil.py
        #+end_src
        """, 1, "'..' leaves"),
    "unsupported argument": ("""
        #+begin_src python :tangle out.py :var x=1
        #+end_src
        """, 1, "unsupported header argument :var"),
    "unsupported value": ("""
        #+begin_src python :tangle out.py :noweb maybe
        #+end_src
        """, 1, ":noweb 'maybe' is not supported"),
    "lisp value": ("""
        #+begin_src python :tangle (concat "a" ".py")
        #+end_src
        """, 1, "Emacs Lisp values are not supported"),
    "star inside block": ("""
        #+begin_src python :tangle out.py
        x = 1
        * not a heading
        #+end_src
        """, 3, "escape it as ',*'"),
    "missing folder": ("""
        #+begin_src python :tangle sub/out.py
        #+end_src
        """, 1, "add ':mkdirp yes'"),
    "inherited bad argument": ("""
        * H
        :PROPERTIES:
        :header-args: :padline sometimes
        :END:
        #+begin_src python :tangle out.py
        #+end_src
        """, 5, ":padline 'sometimes'"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_the_line_and_write_nothing(case, tmp_path, capsys):
    org, line, message = ERRORS[case]
    # A previous good tangle left files; the failing one must not touch them.
    (tmp_path / "out.py").write_text("previous = True\n")
    before = tree(tmp_path)
    assert run(tmp_path, org) == 1
    err = capsys.readouterr().err
    assert f"doc.org:{line}: " in err and message in err, err
    after = {k: v for k, v in tree(tmp_path).items() if k != "doc.org"}
    assert after == before


def test_symlink_escape_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    book = tmp_path / "book"
    book.mkdir()
    (book / "link").symlink_to(outside)
    assert run(book, """
        #+begin_src python :tangle link/x.py
        #+end_src
        """) == 1
    assert "through a symlink" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


def test_noweb_tangle_child_with_references_refused(tmp_path, capsys):
    assert run(tmp_path, """
        #+begin_src python :tangle out.py :noweb yes
        <<child>>
        #+end_src
        #+name: child
        #+begin_src python :noweb tangle
        <<grandchild>>
        #+end_src
        #+name: grandchild
        #+begin_src python
        x = 1
        #+end_src
        """) == 1
    assert "doc.org:5:" in capsys.readouterr().err


# --- Writes: atomic, mtime kept, stale files removed, deterministic -------------------------

DOC = """
    #+PROPERTY: header-args:python :mkdirp yes
    #+begin_src python :tangle build/a.py
    a = 1
    #+end_src
    #+begin_src python :tangle build/b.py
    b = 2
    #+end_src
    """


def test_unchanged_files_keep_mtime_and_removed_targets_go(tmp_path):
    assert run(tmp_path, DOC) == 0
    a, b = tmp_path / "build/a.py", tmp_path / "build/b.py"
    old = time.time() - 1000
    os.utime(a, (old, old))
    os.utime(b, (old, old))
    assert run(tmp_path, DOC.replace("b = 2", "b = 3")) == 0
    assert a.stat().st_mtime == old
    assert b.stat().st_mtime != old and b.read_text() == "b = 3\n"
    assert run(tmp_path, DOC.split("    #+begin_src python :tangle build/b.py")[0]) == 0
    assert a.exists() and not b.exists()


def test_tangle_twice_is_identical(tmp_path):
    assert run(tmp_path, DOC) == 0
    first = tree(tmp_path)
    assert run(tmp_path, DOC) == 0
    assert tree(tmp_path) == first


def test_check_catches_hand_edit_missing_and_extra(tmp_path, capsys):
    assert run(tmp_path, DOC) == 0
    assert run(tmp_path, DOC, "--check") == 0
    (tmp_path / "build/a.py").write_text("a = 'edited by hand'\n")
    (tmp_path / "build/b.py").unlink()
    (tmp_path / "build/c.py").write_text("c = 3\n")
    before = tree(tmp_path)
    capsys.readouterr()
    assert run(tmp_path, DOC, "--check") == 1
    out = capsys.readouterr().out
    assert "stale: build/a.py" in out and "missing: build/b.py" in out and "extra: build/c.py" in out
    assert {k: v for k, v in tree(tmp_path).items() if k != "doc.org"} == \
        {k: v for k, v in before.items() if k != "doc.org"}


# --- The source map ---------------------------------------------------------------------------

def test_where_names_the_org_line(tmp_path, capsys):
    org = """
        #+PROPERTY: header-args:python :noweb yes
        #+begin_src python :tangle out.py
        def f():
            <<body>>
        #+end_src

        #+name: body
        #+begin_src python
        x = 1
        return x
        #+end_src
        """
    assert run(tmp_path, org) == 0
    assert read(tmp_path, "out.py") == "def f():\n    x = 1\n    return x\n"
    capsys.readouterr()
    assert tangle.main(["where", "--org", str(tmp_path / "doc.org"), str(tmp_path / "out.py:3")]) == 0
    assert capsys.readouterr().out.strip() == "doc.org:10 ⟨body⟩"


def test_traceback_frames_point_into_org(tmp_path):
    assert run(tmp_path, """
        #+begin_src python :tangle boom.py
        def boom():
            raise ValueError("from tangled code")
        #+end_src
        """) == 0
    import importlib.util
    spec = importlib.util.spec_from_file_location("boom", tmp_path / "boom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ValueError) as excinfo:
        module.boom()
    assert book_frames(excinfo.tb, tmp_path / "doc.org") == ["boom.py:2 -> doc.org:3 ⟨boom.py⟩"]


def test_llm_main_excepthook_names_org_line(monkeypatch, capsys):
    main = pytest.importorskip("llm.__main__")

    def fail(name):
        raise RuntimeError("no module today")
    monkeypatch.setattr(main.importlib, "import_module", fail)
    with pytest.raises(RuntimeError) as excinfo:
        main.main(["info"])
    main.excepthook(RuntimeError, excinfo.value, excinfo.value.__traceback__)
    err = capsys.readouterr().err
    assert "RuntimeError: no module today" in err
    line = next(n for n, text in enumerate((ROOT / "llm.org").read_text().split("\n"), 1)
                if "getattr(importlib.import_module(module), function)" in text)
    assert f"-> llm.org:{line} ⟨build/llm/__main__.py⟩" in err


def test_llm_org_is_in_sync_and_fast():
    """The book tangles cleanly; `make test` has just tangled it, so --check must pass."""
    result = subprocess.run([sys.executable, "tangle.py", "--check", "llm.org"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_blocks_are_literal(tmp_path):
    assert run(tmp_path, """
        #+begin_example
        #+begin_src python :tangle never.py
        shown, not tangled
        #+end_src
        #+end_example
        #+begin_src python :tangle out.py
        x = 1
        #+end_src
        """) == 0
    assert read(tmp_path, "out.py") == "x = 1\n" and not (tmp_path / "never.py").exists()
