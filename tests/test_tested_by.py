"""Tested by: which tests run which block, measured by tested_by.py, printed by the weave."""
import json
import shutil
from pathlib import Path

import pytest

import tangle
import tested_by
import weave

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "weave"

# The fixture book's own test suite: one test calls count() in-process, one runs report()
# in a subprocess (as many of the real tests run the CLI); no test calls mean().
CONFTEST = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from tested_by import per_test_context
pytest_runtest_protocol = per_test_context()
"""
TESTS = """
import os, subprocess, sys
from pathlib import Path
BUILD = Path(__file__).resolve().parents[1] / "build"
sys.path.insert(0, str(BUILD))
from fixture.count import count

def test_count():
    assert count([1, 2, 3]) == 6

def test_report_in_a_subprocess():
    run = subprocess.run([sys.executable, "-c", "from fixture.report import report; report([4, 5])"],
                         env={**os.environ, "PYTHONPATH": str(BUILD)}, capture_output=True, text=True)
    assert run.stdout.startswith("total 9, count 9"), run.stderr
"""


def test_the_record_matches_the_code():
    """pdf/tested-by.json was measured on the code llm.org tangles now: else `make tested-by`."""
    doc = tangle.parse(ROOT / "llm.org")
    outputs = tangle.tangle_document(doc)
    rec = tested_by.load(doc, outputs)
    assert rec is not None, "no pdf/tested-by.json: run `make tested-by`"
    changed = [f"llm.org:{b.line} ⟨{b.label}⟩" for b in rec.changed]
    assert rec.current and not changed, (
        f"the code changed since pdf/tested-by.json was recorded (blocks: {changed}): "
        "run `make tested-by`")
    assert sum(e.state == "tested" for e in rec.entries.values()) > 50


def test_function_lines_are_the_bodies():
    text = ("import os\nX = 1\n\n\ndef f(a,\n      b):\n    '''doc'''\n    y = (a +\n         b)\n"
            "    return y\n\n\nclass C:\n    z = 2\n\n    def g(self):\n        return [\n"
            "            1]\n\nkey = lambda v: (v,\n                 1)\n")
    assert sorted(tested_by.function_lines(text)) == [7, 8, 9, 10, 17, 18, 20, 21]


def test_test_names_and_labels():
    assert tested_by.test_name("tests/test_x.py::test_y[a-b]") == "test_x.py::test_y"
    assert tested_by.test_name("tests/test_x.py::TestC::test_y") == "test_x.py::TestC::test_y"
    assert weave.test_label("test_x.py::TestC::test_y") == "tb-test_x.TestC.test_y"
    assert weave.test_short("test_x.py::test_y") == "test_y"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The fixture book, tangled, measured with its own two tests, then woven."""
    root = tmp_path_factory.mktemp("tested")
    shutil.copytree(FIXTURE, root / "book")
    org = root / "book" / "book.org"
    tangle.write_outputs(org, tangle.tangle_document(tangle.parse(org)))
    (root / "book" / "tests").mkdir()
    (root / "book" / "tests" / "conftest.py").write_text(CONFTEST)
    (root / "book" / "tests" / "test_fixture.py").write_text(TESTS)
    record, _ = tested_by.measure(org, ["-p", "no:cacheprovider", "tests"])
    assert not record.pop("failed")
    (root / "book" / "pdf").mkdir()
    (root / "book" / tested_by.DATA).write_text(json.dumps(record))
    pdf = root / "book.pdf"
    weave.weave(org, pdf, keep_typst=True)
    return org, record, pdf.with_suffix(".typ").read_text(), weave_text(pdf)


def weave_text(pdf: Path) -> str:
    import pypdf
    return " ".join(" ".join(p.extract_text() for p in pypdf.PdfReader(pdf).pages).split())


def test_each_block_lists_the_tests_that_ran_it(measured):
    org, record, _, _ = measured
    by_first_line = {b["code"]: b for b in record["blocks"]}
    doc = tangle.parse(org)
    tangle.resolve(doc)

    def entry(first: str) -> dict:
        b = next(b for b in doc.blocks if b.body and b.body[0].startswith(first))
        return by_first_line[tested_by.block_hash(b)]
    both = ["test_fixture.py::test_count", "test_fixture.py::test_report_in_a_subprocess"]
    assert entry("def count(")["tests"] == both             # its own `total = 0`, `return total`
    assert entry("for x in xs:")["tests"] == both           # in count.py and, in the subprocess, report.py
    assert entry("total += x")["tests"] == both
    assert entry("from fixture.count")["tests"] == both[1:]  # only in the subprocess
    assert entry("count(xs) / len(xs)") == {**entry("count(xs) / len(xs)"), "tests": [], "statements": 1}
    # Imports, `def` lines and constants run at import: they count for no test.
    assert entry('"""Counting things."""')["statements"] == 0
    assert entry("HIDDEN_CONSTANT")["statements"] == 0
    assert entry("def mean(")["statements"] == 0             # its body line is ⟨mean expr⟩'s


def test_the_labels_and_the_listing(measured):
    org, _, source, text = measured
    assert "Tested by 2 tests: test_count, test_report_in_a_subprocess." in text
    assert "Tested by 1 test: test_report_in_a_subprocess." in text
    assert text.count("No test runs this chunk.") == 2                  # mean and ⟨mean expr⟩
    assert "No function body: it runs when its module is imported." in text
    assert '("test_count", "tb-test_fixture.test_count")' in source      # the names are links
    # The listing, in the appendix the book places it in: each test with its blocks' pages.
    assert '#metadata("test") <tb-test_fixture.test_count>' in source
    listing = text[text.index("The tests Each test that runs"):]
    assert listing.startswith("The tests Each test that runs the book's code, with the pages of "
                              "the blocks it runs: test_fixture.py test_count 2 "
                              "test_report_in_a_subprocess 2, 4")


def test_a_changed_block_is_not_given_old_tests(measured, tmp_path, capsys):
    org, _, _, _ = measured
    book = tmp_path / "book"
    shutil.copytree(org.parent, book)
    changed = book / "book.org"
    changed.write_text(changed.read_text().replace("total += x", "total += 2 * x"))
    doc = tangle.parse(changed)
    rec = tested_by.load(doc, tangle.tangle_document(doc))
    assert not rec.current and [b.body for b in rec.changed] == [["total += 2 * x"]]
    _, source = weave.book_source(changed)
    step = f"blk-{tangle.parse(changed).lines.index('total += 2 * x')}"
    assert f'#metadata("chunk") <{step}>\n#chunk(name: "count step", next' in source
    assert source.count('tested: (state: "stale")') == 1
    assert source.count('tested: (state: "tested"') == 4        # the others keep their tests
    assert "pdf/tested-by.json was recorded on other code (1 blocks changed" in capsys.readouterr().err
