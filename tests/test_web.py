"""The web edition (web.py): built from the fixture book and from llm.org, then opened in a
headless Chromium as a reader would open it, at a phone's width and a desktop's."""
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import literate
import web

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "weave" / "book.org"
ARTIFACTS = ROOT / "test-artifacts"     # git-ignored: the screenshots a person looks at
WIDTHS = (390, 1280)


@pytest.fixture(scope="module")
def fixture_prepared():
    import weave
    return weave.prepare(FIXTURE)


@pytest.fixture(scope="module")
def fixture_site(fixture_prepared):
    return web.site(FIXTURE, fixture_prepared)


@pytest.fixture(scope="module")
def llm_site(llm_book):
    return web.site(ROOT / "llm.org", llm_book())


def text(files, name):
    return files[name].decode("utf-8")


def test_fixture_pages_labels_and_numbers(fixture_site):
    files = fixture_site
    assert {"index.html", "indexes.html", "preface.html", "part-i-basics.html",
            "01-counting-things.html", "02-tables-and-figures.html", "a-extra-notes.html",
            "book.css", "figures/curve.png"} <= set(files)
    ch1 = text(files, "01-counting-things.html")
    # Chunk labels, continuations and uses, as the PDF prints them.
    assert '⟨count loop⟩</a><span class="defn">≡</span>' in ch1
    assert '⟨count step⟩</a><span class="defn">+≡</span>' in ch1
    assert '<span class="file">→ build/fixture/count.py</span>' in ch1
    assert 'continued from <a href="#blk-41">§1.1</a>' in ch1
    assert ('Used in <a href="#blk-41"><code>build/fixture/count.py</code></a> (§1.1), '
            '<a href="02-tables-and-figures.html#blk-119">') in ch1
    # A noweb reference in code is a link to the chunk, on whatever page it is.
    assert '<a class="chunk-name" href="#blk-52">⟨count loop⟩</a>' in ch1
    assert ('<a class="chunk-name" href="01-counting-things.html#blk-52">⟨count loop⟩</a>'
            in text(files, "02-tables-and-figures.html"))
    # Numbered equations (chapter.n), their references, MathML; figure and table numbers.
    assert '<span class="eqno">(1.1)</span>' in ch1 and '<a href="#eq:sum">(1.1)</a>' in ch1
    assert '<span class="eqno">(1.2)</span>' in ch1 and "<math" in ch1 and "<mfrac>" in ch1
    ch2 = text(files, "02-tables-and-figures.html")
    assert 'Table <a href="#tab-counts">1</a>' in ch2 and "Table 1:</span> Counts" in ch2
    assert '<img src="figures/curve.png"' in ch2 and "Figure 1:</span> A curve" in ch2
    # Hidden blocks, COMMENT subtrees and Typst stay out; no script anywhere.
    everything = "".join(v.decode("utf-8", "replace") for k, v in files.items() if k.endswith(".html"))
    assert "HIDDEN_CONSTANT" not in everything and "DRAFT" not in everything
    assert "<script" not in everything and "@@W:" not in everything and "WEAVEREF" not in everything
    index = text(files, "indexes.html")
    assert re.search(r"⟨count step⟩</a> defined <a href=\"01-counting-things.html#blk-59\">§1.1</a>",
                     index)


def static_links(files) -> list[str]:
    """Every `page#id` link of the site that names a page or an id that is not there."""
    ids = {name: set(map(html.unescape, web.ID.findall(data.decode())))
           for name, data in files.items() if name.endswith(".html")}
    bad = []
    for name, data in files.items():
        if not name.endswith(".html"):
            continue
        for href in re.findall(r'(?:href|src)="([^"]*)"', data.decode()):
            if re.match(r"^[a-z]+:", href):
                continue
            page, _, frag = html.unescape(href).partition("#")
            page = page or name
            if page not in files or (frag and frag not in ids.get(page, ())):
                bad.append(f"{name}: {href}")
    return bad


def test_fixture_links_resolve_and_builds_repeat(fixture_site, fixture_prepared):
    assert static_links(fixture_site) == []
    import weave
    again = web.site(FIXTURE, weave.prepare(FIXTURE))
    assert again == fixture_site          # the same book gives the same bytes


def test_a_folder_web_did_not_write_is_refused(tmp_path, capsys):
    out = tmp_path / "site"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    assert web.main([str(FIXTURE), "-o", str(out)]) == 1
    assert "was not written by web.py" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "a user's file"


def test_write_folder_replaces_only_its_own(tmp_path):
    out = tmp_path / "site"
    literate.write_folder(out, {"a.html": b"1", "x/b.png": b"2", web.MARKER: b""}, web.MARKER)
    literate.check_generated_folder(out, web.MARKER, "web.py")
    literate.write_folder(out, {"c.html": b"3", web.MARKER: b""}, web.MARKER)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [web.MARKER, "c.html"]
    assert [p.name for p in tmp_path.iterdir()] == ["site"]     # no temporary left


def test_the_real_book_pages(llm_site):
    files = llm_site
    pages = [n for n in files if n.endswith(".html")]
    assert len(pages) > 25 and "06-attention.html" in pages
    assert static_links(files) == []
    everything = "".join(text(files, n) for n in pages)
    assert "<script" not in everything and "@@W:" not in everything and "WEAVEREF" not in everything
    assert ">?</a>" not in everything and "(?)" not in everything   # every place was found
    assert 'id="refs"' in text(files, "references.html") and "Sennrich" in text(files, "references.html")


# ---------------------------------------------------------------------------
# In a browser
# ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium): "
    "the web edition is not checked in a browser")

# Runs in the test's copy of the site only (the book has no script): each page in an iframe
# of the width under test; what it measures goes into the DOM that Chromium prints.
PROBE = r"""
<script>
window.addEventListener('load', () => {
  const out = [];
  for (const f of document.querySelectorAll('iframe')) {
    const d = f.contentDocument, win = d.defaultView;
    const r = {file: f.dataset.file, width: win.innerWidth, ids: [], links: [], overflow: [],
               wide: d.documentElement.scrollWidth - win.innerWidth,
               maths: 0, notMathML: 0, fracs: 0, flatFracs: 0};
    for (const e of d.querySelectorAll('[id]')) r.ids.push(e.id);
    for (const a of d.querySelectorAll('a[href]')) r.links.push(a.getAttribute('href'));
    const main = d.querySelector('main').getBoundingClientRect();
    for (const pre of d.querySelectorAll('pre')) {
      const b = pre.getBoundingClientRect();
      if (pre.scrollWidth > pre.clientWidth + 1 || b.left < main.left - 1 || b.right > main.right + 1)
        r.overflow.push([(pre.closest('[id]') || {}).id || '', pre.scrollWidth, pre.clientWidth,
                         Math.round(b.right), Math.round(main.right)]);
    }
    for (const m of d.querySelectorAll('math')) {
      r.maths++;
      if (!(m instanceof win.MathMLElement) || m.getBoundingClientRect().width === 0) r.notMathML++;
    }
    for (const m of d.querySelectorAll('mfrac')) {
      r.fracs++;
      const [num, den] = m.children;
      if (num.getBoundingClientRect().bottom > den.getBoundingClientRect().top + 0.5) r.flatFracs++;
    }
    out.push(r);
  }
  const p = document.createElement('pre');
  p.id = 'probe';
  p.textContent = JSON.stringify(out);
  document.body.appendChild(p);
});
</script>
"""


def chromium(*args, timeout=300) -> str:
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS="disabled:")
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--hide-scrollbars", "--no-first-run", "--disable-extensions",
                          "--allow-file-access-from-files", *args],
                         capture_output=True, text=True, timeout=timeout, env=env)
    return run.stdout


def probe(folder: Path, pages: list[str], width: int) -> list[dict]:
    frames = "\n".join(f'<iframe data-file="{p}" src="{p}" style="width:{width}px;height:300px">'
                       "</iframe>" for p in pages)
    harness = folder / f"probe-{width}.html"
    harness.write_text(f"<!DOCTYPE html><html><body>{frames}{PROBE}</body></html>")
    dom = chromium(f"--window-size={width + 40},1000", "--dump-dom", harness.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, f"the probe found nothing at {width} px:\n{dom[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    out.unlink(missing_ok=True)
    chromium(f"--window-size={width},{height}", f"--screenshot={out}", page.as_uri())
    assert out.is_file(), f"chromium wrote no screenshot {out}"
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == width


@needs_chromium
def test_the_web_book_in_a_browser(llm_site, tmp_path):
    """MathML renders, no code block overflows its box at 390 and 1280 px, every internal
    link resolves; screenshots of one chapter at both widths go to test-artifacts/."""
    site = tmp_path / "html"
    literate.write_folder(site, llm_site, web.MARKER)
    pages = sorted(n for n in llm_site if n.endswith(".html"))
    for width in WIDTHS:
        found = probe(site, pages, width)
        assert [r["file"] for r in found] == pages
        assert all(r["width"] == width for r in found)
        ids = {r["file"]: set(r["ids"]) for r in found}
        broken, overflow, wide = [], [], []
        for r in found:
            for href in r["links"]:
                if re.match(r"^[a-z]+:", href):
                    continue
                page, _, frag = href.partition("#")
                page = page or r["file"]
                if page not in ids and page not in llm_site or frag and frag not in ids.get(page, ()):
                    broken.append(f"{r['file']}: {href}")
            overflow += [f"{r['file']}: {o}" for o in r["overflow"]]
            if r["wide"] > 0:
                wide.append(f"{r['file']}: {r['wide']} px too wide")
        assert broken == [] and overflow == [] and wide == [], (width, broken[:5], overflow[:5], wide)
        maths = sum(r["maths"] for r in found)
        fracs = sum(r["fracs"] for r in found)
        assert maths > 500 and fracs > 20       # the book's math, as MathML elements ...
        assert sum(r["notMathML"] for r in found) == 0
        assert sum(r["flatFracs"] for r in found) == 0   # ... laid out: fractions stacked
    ARTIFACTS.mkdir(exist_ok=True)
    for width, height in ((390, 2400), (1280, 1600)):
        screenshot(site / "06-attention.html", ARTIFACTS / f"web-attention-{width}.png", width, height)
