"""Results in the book: values the code computes, cited by the prose, recorded when frozen."""
import json
import shutil
from pathlib import Path

import pytest

import results
import tangle
import weave

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "results" / "book.org"


def doc_of(org: Path, text: str | None = None) -> tangle.Document:
    doc = tangle.parse(org, text)
    tangle.resolve(doc)
    return doc


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    """The fixture book in a folder of its own, its frozen result recorded."""
    org = tmp_path_factory.mktemp("results") / "book.org"
    shutil.copy(FIXTURE, org)
    assert results.record(doc_of(org)) == ["pdf/results/r-frozen.json"]
    return org


def edited(book: Path, tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the recorded fixture book with one edit."""
    shutil.copytree(book.parent, tmp_path / "book")
    org = tmp_path / "book" / "book.org"
    text = org.read_text()
    assert text.count(old) == 1, old
    org.write_text(text.replace(old, new))
    return org


def line_of(org: Path, text: str) -> int:
    return next(k + 1 for k, s in enumerate(org.read_text().split("\n")) if text in s)


def test_render_takes_the_format_of_the_description():
    assert results.render(124439808, "124,439,808") == "124,439,808"
    assert results.render(124439808, "124439808") == "124439808"
    assert results.render(4262144, "4.26M") == "4.26M"
    assert results.render(28311552, "28 M") == "28 M"
    assert results.render(0.1283, "13%") == "13%"
    assert results.render(8.317766, "8.32") == "8.32"
    assert results.render(8.317766, "8.3178") == "8.3178"
    assert results.render(0.3162, ".32") == ".32"
    assert results.render(124439808) == "124,439,808"
    assert results.render(8.317766) == "8.318"
    assert results.render("cpu", "cpu") == "cpu"
    assert results.agrees(8.317766, "8.32") and not results.agrees(8.317766, "8.31")


def test_cheap_and_frozen_values(book):
    res = results.load(doc_of(book))
    assert res.warnings == []
    assert res.values["r-squares"] == {"big": 1522756, "mean": 38.5, "ratio": 0.025}
    assert res.values["r-table"] == [["n", "square"], [1, 1], [2, 4], [3, 9]]
    assert res.values["r-frozen"] == {"total": 385}
    record = json.loads((book.parent / "pdf/results/r-frozen.json").read_text())
    assert set(record["inputs"]) == {"build/fixture/squares.py"}
    assert (book.parent / "pdf/results/r-frozen.png").read_bytes()[:4] == b"\x89PNG"
    assert results.check(res) == []


def test_the_values_appear_in_the_woven_book(book):
    _, source = weave.book_source(book)
    for text in ("1,522,756, the mean", "is /* book.org:20 */38.5", "2.5% or", "0.025.",
                 "1.52M.", "squares is /* book.org:45 */385", "[2], [4],",
                 'image("/pdf/results/r-frozen.png"'):
        assert text in source, text
    assert "result:" not in source


def test_changed_code_marks_a_frozen_result_stale(book, tmp_path, capsys):
    org = edited(book, tmp_path, "fig.savefig(figure_path, dpi=50)", "fig.savefig(figure_path, dpi=40)")
    res = results.load(doc_of(org))
    assert res.values["r-frozen"] == {"total": 385}       # the recorded value, still used
    assert res.warnings == [f"book.org:{line_of(org, '#+begin_src python :tangle no :results value :cache')}"
                            ": result r-frozen is stale (its code changed since it was recorded): "
                            "run `make results`"]
    weave.book_source(org)
    assert "r-frozen is stale" in capsys.readouterr().err
    results.record(doc_of(org), ["r-frozen"])
    assert results.load(doc_of(org)).warnings == []


def test_a_changed_input_marks_a_frozen_result_stale(book, tmp_path):
    org = edited(book, tmp_path, '"""n squared."""', '"""The square of n."""')
    res = results.load(doc_of(org))       # load() tangles: build/fixture/squares.py changes
    assert len(res.warnings) == 1
    assert "r-frozen is stale (changed since it was recorded: build/fixture/squares.py)" in res.warnings[0]


def test_a_missing_input_is_taken_on_trust(book, tmp_path):
    org = edited(book, tmp_path, ":inputs build/fixture/squares.py", ":inputs build/fixture/squares.py runs/x.json")
    record = json.loads((org.parent / "pdf/results/r-frozen.json").read_text())
    record["inputs"]["runs/x.json"] = "0" * 64          # recorded where the run existed
    (org.parent / "pdf/results/r-frozen.json").write_text(json.dumps(record))
    assert results.load(doc_of(org)).warnings == []


def test_an_unrecorded_frozen_result_is_named(tmp_path):
    org = tmp_path / "book.org"
    shutil.copy(FIXTURE, org)
    res = results.load(doc_of(org))
    assert "frozen result r-frozen is not recorded" in res.warnings[0]
    assert results.check(res) == [f"book.org:{line_of(org, '[[result:r-frozen.total]')}: "
                                  "[[result:r-frozen.total]]: result r-frozen has no value: "
                                  "run `make results`"]


def test_a_wrong_number_in_the_prose_fails(book, tmp_path, capsys):
    org = edited(book, tmp_path, "[[result:r-squares.mean][38.5]]", "[[result:r-squares.mean][38.4]]")
    line = line_of(org, "38.4")
    assert results.check(results.load(doc_of(org))) == [
        f"book.org:{line}: [[result:r-squares.mean]]: the prose says '38.4', "
        "the code computes '38.5' (38.5)"]
    _, source = weave.book_source(org)         # the book prints the truth, and says so
    assert "squares is /* book.org:20 */38.5" in source
    assert "the prose says '38.4'" in capsys.readouterr().err
    assert results.main(["--check", str(org)]) == 1


def test_a_wrong_frozen_number_fails(book, tmp_path):
    org = edited(book, tmp_path, "[[result:r-frozen.total][385]]", "[[result:r-frozen.total][386]]")
    assert "the prose says '386', the code computes '385'" in results.check(results.load(doc_of(org)))[0]


@pytest.mark.parametrize("link, why", [
    ("[[result:r-nothing.x][3]]", "no result named r-nothing (results: r-frozen, r-squares, r-table)"),
    ("[[result:r-squares.small][3]]", "result r-squares has no key 'small' (keys: big, mean, ratio)"),
])
def test_a_missing_result_fails(book, tmp_path, link, why):
    org = edited(book, tmp_path, "[[result:r-squares.big][1,522,756]]", link)
    doc = doc_of(org)
    line = line_of(org, link)
    assert results.check(results.load(doc)) == [f"book.org:{line}: {link.split('][')[0]}]]: {why}"]
    with pytest.raises(tangle.TangleError, match=f"book.org:{line}: .*{why[:20]}"):
        weave.book_source(org)


def test_a_failing_result_names_its_line(tmp_path):
    org = tmp_path / "book.org"
    org.write_text("* A\n\n[[result:r-bad.x][1]]\n\n#+name: r-bad\n"
                   "#+begin_src python :results value\nx = 1\nresult = {'x': 1 / 0}\n#+end_src\n")
    with pytest.raises(tangle.TangleError, match=r"book.org:6: result r-bad failed:(.|\n)*"
                       r"book.org\", line 8(.|\n)*ZeroDivisionError"):
        results.load(doc_of(org))


@pytest.mark.parametrize("block, why", [
    ("#+begin_src python :results value\nresult = 1\n#+end_src", "needs a #\\+name"),
    ("#+name: r-x\n#+begin_src python :results value :tangle x.py\nresult = 1\n#+end_src",
     "r-x is tangled to x.py: give it :tangle no"),
])
def test_malformed_result_blocks(tmp_path, block, why):
    org = tmp_path / "book.org"
    org.write_text(f"* A\n\n{block}\n")
    with pytest.raises(tangle.TangleError, match=why):
        results.specs_of(doc_of(org))


def test_the_book_states_what_its_code_computes():
    """llm.org: every cited result exists and agrees with the code; no frozen one is stale."""
    res = results.load(doc_of(ROOT / "llm.org"))
    assert results.check(res) == []
    assert res.warnings == []
    assert len(results.citations(res.doc)) >= 10


def test_a_failing_record_keeps_the_recorded_figure_and_record(book, tmp_path):
    org = edited(book, tmp_path, "fig.savefig(figure_path, dpi=50)",
                 "fig.savefig(figure_path, dpi=40)\nraise RuntimeError('drawn, then failed')")
    figure = org.parent / "pdf/results/r-frozen.png"
    record = org.parent / "pdf/results/r-frozen.json"
    before = figure.read_bytes(), record.read_bytes()
    with pytest.raises(tangle.TangleError, match="drawn, then failed"):
        results.record(doc_of(org), ["r-frozen"])
    assert (figure.read_bytes(), record.read_bytes()) == before
    assert not list((org.parent / "pdf/results").glob(".figures-*"))   # no scratch left
