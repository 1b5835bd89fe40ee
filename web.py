"""web.py: the web edition. `python web.py [llm.org] [-o html]` -> html/.

One page per part and chapter, a contents page (index.html) and the indexes
(indexes.html), from the same reading of llm.org as the PDF: weave.prepare() gives the
model of the book, pandoc's AST and the results; WebRewriter is weave's Rewriter with its
Typst pieces replaced by HTML ones (chunk labels, numbered equations, figure and table
numbers, links to chunks). Pandoc then writes the whole book as HTML in one run (math as
MathML, code highlighted, citations by citeproc), and the result is cut into pages at
markers between chapters; every `#id` link is pointed at the page that holds the id.

No JavaScript, no web fonts, nothing fetched: the folder works offline, opened as files.
The same input gives the same bytes. The folder is replaced whole (a temporary sibling,
then a rename), and only if it is one this program wrote (it holds `.weave-web`).
"""
from __future__ import annotations

import html as htmllib
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import literate
import weave
from weave import Piece, el, stringify

STYLE = Path(__file__).resolve().parent / "pdf" / "book.css"
MARKER = ".weave-web"                 # in a folder this program wrote
PAGE = "<!--WEAVE-PAGE:{}-->"
PAGE_RE = re.compile(r"<!--WEAVE-PAGE:(\d+)-->\n?")
HOLE = re.compile(r"@@W:(\w+):([^@]*)@@")     # filled in when every number is known
NOWEB = "WEAVEREF{}X"                 # a noweb reference inside code, made a link after pandoc
NOWEB_RE = re.compile(r"WEAVEREF(\d+)X")


def esc(s: str) -> str:
    return htmllib.escape(s, quote=True)


def raw(code: str) -> dict:
    return el("RawInline", ["html", code])


def raw_block(code: str) -> dict:
    return el("RawBlock", ["html", code])


def hole(kind: str, key: str) -> str:
    return f"@@W:{kind}:{key}@@"


def slug(title: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", title.lower()).strip("-")[:48] or "page"


@dataclass
class Page:
    file: str
    title: str                        # plain text
    number: str | None                # "3", "A", or None (parts, preface)
    level: int                        # 1 part, 2 chapter, 0 contents and indexes
    toc: list = field(default_factory=list)     # (level, number, title, id) of its headings


class WebRewriter(weave.Rewriter):
    """weave's pass over pandoc's AST, writing HTML where the PDF has Typst."""

    def __init__(self, book, ast, res=None):
        super().__init__(book, ast, res)
        self.pages: list[Page] = []
        self.appendix = False
        self.chapter = 0
        self.chapter_label: str | None = None
        self.counts = {"section": 0, "equation": 0, "figure": 0, "table": 0}
        self.section = ""                 # where we are: "§3.2", or a title if unnumbered
        self.where: dict[str, str] = {}   # block id -> its section
        self.numbers: dict[str, str] = {}  # equation, figure and table labels -> numbers
        self.noweb: list[str] = []        # the chunk of each noweb placeholder
        self.images: dict[str, Path] = {}  # figures/NAME -> the file it copies

    # -- headings and pages ----------------------------------------------------
    def mark_inline(self, line=None) -> list:
        return []

    def mark_block(self, line=None) -> list:
        return []

    def matter(self, kind: str) -> list:
        if kind == "appendices":
            self.appendix, self.chapter = True, 0
        return []

    def heading(self, line: int, level: int, attr: list, inlines: list) -> list:
        numbered = "unnumbered" not in attr[1] and level in (2, 3)
        title = stringify(inlines).strip()
        number = None
        out = []
        if level <= 2:
            if level == 2 and numbered:
                self.chapter += 1
                number = chr(ord("A") + self.chapter - 1) if self.appendix else str(self.chapter)
            self.chapter_label = number if level == 2 else None
            self.counts.update(section=0, equation=0)
            name = (f"{number.lower() if self.appendix else f'{int(number):02d}'}-{slug(title)}"
                    if number else slug(title))
            self.pages.append(Page(f"{name}.html", title, number, level))
            out.append(raw_block(PAGE.format(len(self.pages) - 1)))
            self.section = (f"{'Appendix' if self.appendix else 'Chapter'} {number}"
                            if number else title)
        elif numbered and self.chapter_label:
            self.counts["section"] += 1
            number = f"{self.chapter_label}.{self.counts['section']}"
            self.section = f"§{number}"
        elif level == 3:
            self.section = title
        if self.pages and level <= 3:
            self.pages[-1].toc.append((level, number, title, attr[0]))
        head = inlines
        if number:
            kind = ("Appendix" if self.appendix else "Chapter") if level == 2 else None
            text = f"{kind} {number}" if kind else number
            head = [el("Span", [["", ["number"], []], [el("Str", text)]]), el("Space")] + inlines
        elif level == 1 and (m := re.match(r"^(Part [IVXLC]+):\s*(.+)$", title)):
            head = [el("Span", [["", ["number"], []], [el("Str", m.group(1))]]), el("Space"),
                    el("Str", m.group(2))]
        # Parts and chapters open a page (h1); sections are h2, subsections h3.
        return out + [el("Header", [max(1, level - 1), attr, head])]

    # -- code -----------------------------------------------------------------
    def chunk_block(self, p: Piece) -> list:
        b, book = p.block, self.book
        self.where[p.id] = self.section
        head = []
        if p.chunk:
            plus = book.chunks[p.chunk][0] is not p
            head.append(f'<a class="chunk-name" href="#{p.id}">⟨{esc(weave.display_name(p.chunk))}'
                        f'⟩</a><span class="defn">{"+≡" if plus else "≡"}</span>')
        if p.target:
            head.append(f'<span class="file">→ {esc(p.target)}</span>')
        prev, nxt = book.neighbours(p)
        cont = []
        if prev:
            cont.append(f'continued from <a href="#{prev.id}">{hole("sec", prev.id)}</a>')
        if nxt:
            cont.append(f'continues in <a href="#{nxt.id}">{hole("sec", nxt.id)}</a>')
        if cont:
            head.append(f'<span class="cont">{" · ".join(cont)}</span>')
        body = "\n".join(b.body)
        if p.refs:
            def ref(m):
                name = m.group(2)[2:-2]
                if book.first_definition(name) is None:
                    return m.group(0)
                self.noweb.append(name)
                return m.group(1) + NOWEB.format(len(self.noweb) - 1)
            body = "\n".join(literate.NOWEB_REF.sub(ref, line) for line in body.split("\n"))
        out = [raw_block(f'<div class="chunk-head">{" ".join(head)}</div>')] if head else []
        out.append(el("CodeBlock", [["", [b.lang], []], body]))
        used = [u for u in book.used_in(p) if u.visible]
        if used:
            links = ", ".join(f'<a href="#{u.id}">{self.what(u)}</a> ({hole("sec", u.id)})'
                              for u in used)
            out.append(raw_block(f'<div class="chunk-used">Used in {links}.</div>'))
        return [el("Div", [[p.id, ["chunk"], []], out])]

    def what(self, p: Piece) -> str:
        if p.chunk:
            return f"⟨{esc(weave.display_name(p.chunk))}⟩"
        return f"<code>{esc(p.target)}</code>" if p.target else "a block"

    def caption_note(self, inlines: list) -> list:
        return [el("Div", [["", ["caption"], []], [el("Plain", inlines)]])]

    def chunk_link(self, name: str, p: Piece) -> list:
        return [el("Link", [["", ["chunk-name"], []],
                            [el("Str", f"⟨{weave.display_name(name)}⟩")], ["#" + p.id, ""]])]

    # -- numbers: equations within their chapter, figures and tables through the book ----
    def equation_number(self, label: str | None) -> str:
        """The next equation's number, (3.2) within chapter 3; remembered by its label."""
        self.counts["equation"] += 1
        n = str(self.counts["equation"])
        number = f"{self.chapter_label}.{n}" if self.chapter_label else n
        if label:
            self.numbers[label] = f"({number})"
        return number

    def equation_ref_text(self, kind: str, label: str) -> str:
        """\\eqref: (3.2); \\ref: Equation (3.2), Figure 4 (the number filled in later)."""
        text = hole("num", label)
        if kind != "eqref":
            text = f"{'Equation' if label in self.equations else self.floats[label].title()} {text}"
        return text

    def numbered_equation(self, math: dict, label: str | None) -> list:
        number = self.equation_number(label)
        ident = f' id="{esc(label)}"' if label else ""
        return [raw(f'<span class="equation"{ident}>'), math,
                raw(f'<span class="eqno">({number})</span></span>')]

    def equation_ref(self, kind: str, label: str) -> list:
        return [el("Link", [["", [], []], [el("Str", self.equation_ref_text(kind, label))],
                            ["#" + label, ""]])]

    def float_ref(self, target: str) -> list:
        return [el("Link", [["", [], []], [el("Str", hole("num", target))], ["#" + target, ""]])]

    def numbered(self, kind: str, ident: str, caption: list) -> list:
        self.counts[kind] += 1
        n = str(self.counts[kind])
        if ident:
            self.numbers[ident] = n
        blocks = caption[1]
        label = el("Span", [["", ["float-number"], []], [el("Str", f"{kind.title()} {n}:")]])
        if blocks and blocks[0]["t"] in ("Plain", "Para"):
            return [el(blocks[0]["t"], [label, el("Space")] + blocks[0]["c"])] + blocks[1:]
        return blocks

    def figure(self, x: dict) -> dict:
        x = super().figure(x)
        attr, caption, body = x["c"]
        return el("Figure", [attr, [caption[0], self.numbered("figure", attr[0], caption)], body])

    def table(self, x: dict) -> dict:
        x = super().table(x)
        attr, caption = x["c"][0], x["c"][1]
        x["c"][1] = [caption[0], self.numbered("table", attr[0], caption)]
        return x

    def image_url(self, rel: str) -> str:
        name = f"figures/{Path(rel).name}"
        real = (self.root / rel).resolve()
        if self.images.setdefault(name, real) != real:
            name = f"figures/{rel.replace('/', '-')}"
            self.images[name] = real
        return name

    # -- what only Typst understands -----------------------------------------------
    def block(self, x: dict) -> list:
        if x["t"] == "RawBlock" and x["c"][0] == "typst":
            # The References appendix prints the bibliography: citeproc fills #refs.
            return [el("Div", [["refs", [], []], []])] if "#bibliography" in x["c"][1] else []
        return super().block(x)

    def inline(self, x: dict) -> list:
        if x["t"] == "RawInline" and x["c"][0] == "typst":
            return []
        return super().inline(x)


# ---------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------

def fill(text: str, rw: WebRewriter) -> str:
    """The numbers and sections a page cites, and links for noweb references in code."""
    def repl(m):
        kind, key = m.groups()
        if kind == "sec":
            return esc(rw.where.get(key, "?"))
        return rw.numbers.get(key, "?")
    text = HOLE.sub(repl, text)

    def ref(m):
        name = rw.noweb[int(m.group(1))]
        p = rw.book.first_definition(name)
        return (f'<a class="chunk-name" href="#{p.id}">⟨{esc(weave.display_name(name))}'
                f'⟩</a>')
    return NOWEB_RE.sub(ref, text)


ID = re.compile(r'\sid="([^"]+)"')
HREF = re.compile(r'href="#([^"]*)"')


def link_pages(pages: dict[str, str]) -> dict[str, str]:
    """Point every `#id` at the page that holds the id (left as it is where it is on the page)."""
    home = {}
    for file, text in pages.items():
        for ident in ID.findall(text):
            home.setdefault(htmllib.unescape(ident), file)

    def fix(file):
        def repl(m):
            ident = htmllib.unescape(m.group(1))
            where = home.get(ident)
            if where is None or where == file:
                return m.group(0)
            return f'href="{where}#{m.group(1)}"'
        return repl
    return {file: HREF.sub(fix(file), text) for file, text in pages.items()}


def frame(title: str, book_title: str, body: str, prev: Page | None, nxt: Page | None) -> str:
    """A whole page: head, navigation above and below, the body."""
    def nav(where):
        items = ['<a href="index.html">Contents</a>']
        if prev:
            items.append(f'<a rel="prev" href="{prev.file}">← {esc(label(prev))}</a>')
        if nxt:
            items.append(f'<a rel="next" href="{nxt.file}">{esc(label(nxt))} →</a>')
        items.append('<a href="indexes.html">Index</a>')
        return f'<nav class="{where}">{" ".join(items)}</nav>'
    full = esc(book_title) if title == book_title else f"{esc(title)} — {esc(book_title)}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{full}</title>\n<link rel=\"stylesheet\" href=\"book.css\">\n</head>\n"
            f"<body>\n{nav('top')}\n<main>\n{body.strip()}\n</main>\n{nav('bottom')}\n"
            "</body>\n</html>\n")


def label(p: Page) -> str:
    if p.number:
        return f"{p.number} {p.title}"
    return p.title


def contents(rw: WebRewriter, meta: dict) -> str:
    """The contents page: title, then parts, chapters and their sections."""
    out = [f'<header class="title"><h1>{esc(meta["title"] or "")}</h1>']
    if meta.get("subtitle"):
        out.append(f'<p class="subtitle">{esc(meta["subtitle"])}</p>')
    if meta.get("author"):
        out.append(f'<p class="author">{esc(meta["author"])}</p>')
    out.append('</header>\n<nav class="toc">\n<h2>Contents</h2>\n<ul>')
    for page in rw.pages:
        cls = "part" if page.level == 1 else "chapter"
        num = f'<span class="number">{esc(page.number)}</span> ' if page.number else ""
        out.append(f'<li class="{cls}"><a href="{page.file}">{num}{esc(page.title)}</a>')
        sections = [(n, t, i) for lvl, n, t, i in page.toc if lvl == 3]
        if sections:
            out.append("<ul>")
            for n, t, i in sections:
                num = f'<span class="number">{esc(n)}</span> ' if n else ""
                out.append(f'<li><a href="{page.file}#{esc(i)}">{num}{esc(t)}</a></li>')
            out.append("</ul>")
        out.append("</li>")
    out.append('<li class="part"><a href="indexes.html">Indexes: chunks, files, identifiers</a></li>')
    out.append("</ul>\n</nav>")
    return "\n".join(out)


def indexes(rw: WebRewriter) -> str:
    """The chunk index, the files the book builds and the identifier index (each if not empty)."""
    book = rw.book

    def places(pieces: list[Piece]) -> str:
        seen, out = set(), []
        for p in pieces:
            where = rw.where.get(p.id, "?")
            if where not in seen:
                seen.add(where)
                out.append(f'<a href="#{p.id}">{esc(where)}</a>')
        return ", ".join(out)

    out = ['<h1 id="indexes">Indexes</h1>']
    chunks = []
    for name, shown, users in weave.index_chunks(book):
        used = f"used {places(users)}" if users else "not used"
        chunks.append(f'<li><a class="chunk-name" href="#{shown[0].id}">⟨'
                      f'{esc(weave.display_name(name))}⟩</a> defined {places(shown)}; {used}</li>')
    if chunks:
        out += ['<h2 id="index-of-chunks">Index of chunks</h2>',
                "<p>Each chunk: where it is defined, then the blocks that use it.</p>",
                '<ul class="index">', *chunks, "</ul>"]
    files = [f"<li><code>{esc(target)}</code> {places(book.shown(pieces))}</li>"
             for target, pieces in sorted(book.files.items()) if book.shown(pieces)]
    if files:
        out += ['<h2 id="files-the-book-builds">Files the book builds</h2>',
                "<p>Each file: its blocks, in the order they are written to it.</p>",
                '<ul class="index">', *files, "</ul>"]
    if book.identifiers:
        out += ['<h2 id="index-of-identifiers">Index of identifiers</h2>',
                "<p>Each top-level name of the code: its file, the block that defines it, then "
                "the blocks that use it.</p>", '<ul class="index">']
        for ident in book.identifiers:
            used = f"; used {places(ident.users)}" if ident.users else ""
            out.append(f'<li><a href="#{ident.defined.id}"><code>{esc(ident.name)}</code></a> '
                       f'<span class="file">{esc(Path(ident.file).name)}</span> defined '
                       f"{places([ident.defined])}{used}</li>")
        out.append("</ul>")
    return "\n".join(out)


def to_html(book, ast: dict, res) -> tuple[WebRewriter, str]:
    """The rewritten AST as one HTML body, page markers between the pages."""
    rw = WebRewriter(book, ast, res)
    ast = dict(ast, blocks=rw.run())
    for w in rw.warnings:
        print(f"warning: {w}", file=sys.stderr)
    import json
    out, _ = weave.pandoc(book.doc, ["--from=json", "--to=html5", "--mathml", "--citeproc",
                                     "--metadata=link-citations:true", "--wrap=none",
                                     "--reference-location=block"], json.dumps(ast))
    return rw, out


def site(org: Path, prepared: tuple | None = None) -> dict[str, bytes]:
    """Every file of the web edition: relative path -> bytes."""
    book, ast, res = prepared or weave.prepare(org)
    rw, body = to_html(book, ast, res)
    meta = {k: weave.org_keyword(book.doc, k) for k in ("title", "subtitle", "author")}
    title = meta["title"] or org.stem
    parts = PAGE_RE.split(body)
    texts = {}
    front = parts[0].strip()        # anything before the first heading opens the contents
    for k in range(1, len(parts), 2):
        page = rw.pages[int(parts[k])]
        text = parts[k + 1]
        if page.level == 1:         # a part page lists its chapters
            j = rw.pages.index(page) + 1
            items = []
            while j < len(rw.pages) and rw.pages[j].level == 2:
                items.append(f'<li><a href="{rw.pages[j].file}">{esc(label(rw.pages[j]))}</a></li>')
                j += 1
            if items:
                text += '\n<ul class="chapters">\n' + "\n".join(items) + "\n</ul>\n"
        texts[page.file] = fill(text, rw)
    texts["index.html"] = (fill(front, rw) + "\n" if front else "") + contents(rw, meta)
    texts["indexes.html"] = fill(indexes(rw), rw)
    texts = link_pages(texts)
    order = [Page("index.html", title, None, 0)] + rw.pages + [Page("indexes.html", "Indexes", None, 0)]
    files = {}
    for k, page in enumerate(order):
        prev = order[k - 1] if k > 0 else None
        nxt = order[k + 1] if k + 1 < len(order) else None
        files[page.file] = frame(page.title if page.level else
                                 (title if page.file == "index.html" else page.title),
                                 title, texts[page.file], prev, nxt).encode("utf-8")
    files["book.css"] = STYLE.read_bytes()
    for name, real in sorted(rw.images.items()):
        files[name] = real.read_bytes()
    files[MARKER] = b"written by web.py from " + org.name.encode() + b"; replaced whole by it\n"
    return files


def main(argv: list[str] | None = None) -> int:
    return literate.generated_folder_main(
        argv, "web.py", "The web edition: llm.org -> html/ (one page per chapter, contents, "
        "indexes).", "html", site, MARKER, ".html", "pages")


if __name__ == "__main__":
    sys.exit(main())
