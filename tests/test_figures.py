"""The book's figures: enough of them, each captioned, cited near it, and its image recorded."""
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORG = ROOT / "llm.org"
IMAGE = re.compile(r"^\[\[file:([^\]]+\.png)\]\]$")


@dataclass
class Figure:
    name: str       # the #+NAME:, fig-...
    caption: str
    image: str      # the linked file, relative to the book's folder
    line: int       # of the image link, from 1
    chapter: str    # the level-2 heading it sits under


def figures_of(lines: list[str]) -> list[Figure]:
    """Every image link that follows #+CAPTION:/#+NAME: keywords (in either order), or none."""
    out, chapter = [], ""
    for i, line in enumerate(lines):
        if line.startswith("** "):
            chapter = line[3:].strip()
        m = IMAGE.match(line.strip())
        if not m:
            continue
        keywords = {}
        for above in reversed(lines[:i]):            # the keyword lines right above the link
            k = re.match(r"^#\+(CAPTION|NAME):\s*(.*)$", above.strip(), re.I)
            if not k:
                break
            keywords.setdefault(k.group(1).upper(), k.group(2))
        out.append(Figure(keywords.get("NAME", ""), keywords.get("CAPTION", ""), m.group(1),
                          i + 1, chapter))
    return out


def chapter_text(lines: list[str], chapter: str) -> str:
    """The lines under the level-2 heading `chapter`, up to the next level-1 or level-2 one."""
    start = lines.index(f"** {chapter}")
    end = next((k for k in range(start + 1, len(lines)) if re.match(r"^\*{1,2} ", lines[k])),
               len(lines))
    return "\n".join(lines[start:end])


LINES = ORG.read_text(encoding="utf-8").splitlines()
FIGURES = figures_of(LINES)


def test_the_book_has_at_least_fifteen_figures():
    assert len(FIGURES) >= 15, [f.name for f in FIGURES]


def test_figure_names_are_unique_and_say_figure():
    names = [f.name for f in FIGURES]
    assert all(n.startswith("fig-") for n in names), names
    assert len(set(names)) == len(names), names


@pytest.mark.parametrize("fig", FIGURES, ids=lambda f: f.name or f"line {f.line}")
def test_each_figure_is_captioned_cited_in_its_chapter_and_recorded(fig: Figure):
    assert fig.name, f"llm.org:{fig.line}: an image without #+NAME: the text cannot cite it"
    assert len(fig.caption.split()) >= 8, f"llm.org:{fig.line}: {fig.name} needs a caption"
    # Cited from the prose of the chapter that teaches it, not only from somewhere else.
    assert f"[[{fig.name}]]" in chapter_text(LINES, fig.chapter), \
        f"llm.org:{fig.line}: {fig.name} is not cited in its chapter {fig.chapter!r}"
    # Every figure is computed by the book's code and recorded under pdf/results.
    assert fig.image.startswith("pdf/results/"), fig.image
    assert (ROOT / fig.image).is_file(), f"{fig.image} is missing: run make results"


def test_the_figure_parser_finds_what_it_should():
    lines = ["** Chapter", "See figure [[fig-a]].", "#+CAPTION: A caption of a few words "
             "for this test.", "#+NAME: fig-a", "[[file:pdf/results/r-a.png]]",
             "[[file:pdf/results/loose.png]]"]
    a, loose = figures_of(lines)
    assert (a.name, a.image, a.line, a.chapter) == ("fig-a", "pdf/results/r-a.png", 5, "Chapter")
    assert a.caption.startswith("A caption")
    assert (loose.name, loose.caption) == ("", "")
    assert chapter_text(lines, "Chapter").count("[[fig-a]]") == 1
