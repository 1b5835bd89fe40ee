"""literate.py: the core of the book's literate tools, below tangle.py, weave.py and results.py.

It reads an Org file the way Emacs Org 9.x org-babel does and knows what every block
tangles to; the three tools build on it and none of them imports another at load time:

    literate.py   parse, resolve header arguments, expand noweb, check and write targets,
                  the manifest and its source map (tangled line -> Org line)
    results.py    the book's computed results          (imports literate)
    weave.py      the book: Org -> pandoc -> Typst -> PDF (imports literate, results)
    tangle.py     the command line: tangle, --check, where, and weave (imported lazily)

The core is three steps, each a section below:
  1. parse    Org text -> headings, global properties and source blocks (with line numbers)
  2. resolve  header arguments by Org's inheritance; expand noweb references
  3. write    every output computed and checked in memory first, then written atomically
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path


class TangleError(Exception):
    """An error in the Org file, reported as `file:line: message`."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path, self.line, self.message = Path(path), line, message
        where = f"{self.path.name}:{line}" if line else f"{self.path.name}"
        super().__init__(f"{where}: {message}")


def short(text: str, width: int = 60) -> str:
    """A name or path as an error message quotes it: one line, however long the original."""
    return text if len(text) <= width else f"{text[:width - 20]}...{text[-12:]} ({len(text)} characters)"


# ---------------------------------------------------------------------------
# 1. Parse
# ---------------------------------------------------------------------------

# No pattern here ends in `(.*?)[ \t]*$`: on a long run of blanks that is quadratic in the
# line's length. They take the rest of the line, and the code strips trailing blanks.
HEADING = re.compile(r"^(\*+)[ \t]+(.*)$")
# Org's `COMMENT` heading, as a regexp: ^(?:[A-Z]+[ \t]+)?(?:\[#.\][ \t]+)?COMMENT(?:[ \t]|$)
# (matched word by word in commented_title: the regexp backtracks through long blank runs).
TODO_WORD = re.compile(r"[A-Z]+")
PRIORITY = re.compile(r"\[#.\]")
BEGIN_SRC = re.compile(r"^[ \t]*#\+begin_src(?:[ \t]+(.*))?$", re.I)
END_SRC = re.compile(r"^[ \t]*#\+end_src[ \t]*$", re.I)
# Other verbatim blocks (example, export, ...) hold literal text: no code blocks inside.
BEGIN_VERBATIM = re.compile(r"^[ \t]*#\+begin_(example|export|comment)\b", re.I)
KEYWORD = re.compile(r"^[ \t]*#\+([A-Za-z_][\w-]*)(?:\[[^\]]*\])?:(?:[ \t]+(.*))?$")
PLANNING = re.compile(r"^[ \t]*(?:SCHEDULED|DEADLINE|CLOSED):")
DRAWER_BEGIN = re.compile(r"^[ \t]*:PROPERTIES:[ \t]*$", re.I)
DRAWER_END = re.compile(r"^[ \t]*:END:[ \t]*$", re.I)
PROPERTY_LINE = re.compile(r"^[ \t]*:(\S+):(?:[ \t]+(.*))?$")
# Org's unescaping inside blocks: a comma before `*` or `#+` at line start goes away.
ESCAPE = re.compile(r"^([ \t]*),(,*(?:\*|#\+))", re.M)
# Affiliated keywords: lines directly above a block that belong to it.
AFFILIATED = {"name", "header", "headers", "caption", "results", "plot", "srcname",
              "tblname", "label", "data"}


@dataclass
class Heading:
    level: int
    title: str
    line: int
    parent: Heading | None
    commented: bool
    # property name (lower case) -> (base value or None, [values of NAME+ lines])
    props: dict[str, tuple[str | None, list[str]]] = field(default_factory=dict)


@dataclass
class Block:
    line: int                      # line of #+begin_src, 1-based
    end_line: int                  # line of #+end_src
    lang: str
    begin_args: str                # the header arguments on the #+begin_src line
    header_lines: list[tuple[int, str]]  # (line, text) of each #+header: line, in order
    name: str | None
    name_line: int | None
    body: list[str]                # Org's normalized body: escapes and indentation removed
    heading: Heading | None
    params: dict[str, str] = field(default_factory=dict)   # filled by resolve()
    own_args: set[str] = field(default_factory=set)  # keys set by the block's own lines

    @property
    def commented(self) -> bool:
        h = self.heading
        return h is not None and h.commented

    @property
    def label(self) -> str:
        """How the book and the source map name this block."""
        if self.name:
            return self.name
        if self.params.get("noweb-ref"):
            return self.params["noweb-ref"]
        tangle = self.params.get("tangle", "no")
        return tangle if tangle not in ("yes", "no") else (self.heading.title if self.heading else "")


@dataclass
class Document:
    path: Path
    lines: list[str]
    headings: list[Heading]
    blocks: list[Block]
    # `#+PROPERTY:` values by lower-case name, `NAME+` lines already appended
    global_props: dict[str, str]


def parse(path: Path, text: str | None = None) -> Document:
    """Read an Org file into headings and source blocks, keeping line numbers."""
    path = Path(path)
    if text is None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TangleError(path, None, "no such file") from None
        except IsADirectoryError:
            raise TangleError(path, None, "is a folder, not an Org file; name the Org file "
                              "(for example llm.org)") from None
        except OSError as e:
            raise TangleError(path, None, f"cannot read it: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = text_line_of_byte(data, e.start)
            raise TangleError(path, line, f"not valid UTF-8 (byte {e.start}); save the file "
                              "as UTF-8") from None
    if (crlf := text.find("\r\n")) >= 0:
        # Org in Emacs would read such a file as DOS text; this tool reads it as it is, where
        # every line would end in a stray \r (and no #+end_src would be found).
        raise TangleError(path, text.count("\n", 0, crlf) + 1, "the line ends in CR LF "
                          "(Windows line endings); save the file with LF line endings")
    lines = text.split("\n")
    headings: list[Heading] = []
    blocks: list[Block] = []
    global_props: dict[str, str] = {}
    current: Heading | None = None
    i = 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        if m := HEADING.match(line):
            level, title = len(m.group(1)), m.group(2).rstrip(" \t")
            parent = current
            while parent is not None and parent.level >= level:
                parent = parent.parent
            commented = commented_title(title) or (parent is not None and parent.commented)
            current = Heading(level, title, lineno, parent, commented)
            headings.append(current)
            i = read_property_drawer(path, lines, i + 1, current)
            continue
        if m := BEGIN_SRC.match(line):
            blocks.append(read_block(path, lines, i, (m.group(1) or "").rstrip(" \t"), current))
            i = blocks[-1].end_line
            continue
        if END_SRC.match(line):
            raise TangleError(path, lineno, "#+end_src without a #+begin_src")
        if m := BEGIN_VERBATIM.match(line):
            end = re.compile(rf"^[ \t]*#\+end_{m.group(1)}[ \t]*$", re.I)
            k = next((k for k in range(i + 1, len(lines)) if end.match(lines[k])), None)
            if k is None:
                raise TangleError(path, lineno, f"#+begin_{m.group(1)} without #+end_{m.group(1)}")
            i = k + 1
            continue
        if (m := KEYWORD.match(line)) and m.group(1).lower() == "property":
            add_global_property(path, lineno, (m.group(2) or "").rstrip(" \t"), global_props)
        i += 1
    check_unique_names(path, blocks)
    return Document(path, lines, headings, blocks, global_props)


def commented_title(title: str) -> bool:
    """COMMENT as the first word, or after a TODO keyword, a priority cookie, or both."""
    words = re.split(r"[ \t]+", title, maxsplit=3)
    for k in range(min(3, len(words))):
        if words[k] == "COMMENT":
            return True
        if not (k == 0 and TODO_WORD.fullmatch(words[k])
                or k < 2 and PRIORITY.fullmatch(words[k])
                and (k == 0 or TODO_WORD.fullmatch(words[0]))):
            return False
    return False


def text_line_of_byte(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_property_drawer(path: Path, lines: list[str], i: int, heading: Heading) -> int:
    """Org reads a property drawer only right after a heading (and its planning line)."""
    if i < len(lines) and PLANNING.match(lines[i]):
        i += 1
    if i >= len(lines) or not DRAWER_BEGIN.match(lines[i]):
        return i
    start = i
    i += 1
    while i < len(lines) and not DRAWER_END.match(lines[i]):
        m = PROPERTY_LINE.match(lines[i])
        if not m:
            raise TangleError(path, i + 1, f"not a property line inside :PROPERTIES: {lines[i]!r}")
        name, value = m.group(1).lower(), (m.group(2) or "").rstrip(" \t")
        if name.endswith("+"):
            base, plus = heading.props.get(name[:-1], (None, []))
            heading.props[name[:-1]] = (base, plus + [value])
        else:
            base, plus = heading.props.get(name, (None, []))
            # The first NAME line is the base value, as `org--property-local-values` reads it.
            heading.props[name] = (value if base is None else base, plus)
        i += 1
    if i >= len(lines):
        raise TangleError(path, start + 1, ":PROPERTIES: drawer without :END:")
    return i + 1


def add_global_property(path: Path, lineno: int, text: str, props: dict[str, str]) -> None:
    m = re.match(r"(\S+)[ \t]+(.*)", text)
    if not m:
        raise TangleError(path, lineno, f"#+PROPERTY needs a name and a value, got {text!r}")
    name, value = m.group(1).lower(), m.group(2)
    if name.endswith("+"):
        name = name[:-1]
        props[name] = f"{props[name]} {value}" if name in props else value
    else:
        props[name] = value


def read_block(path: Path, lines: list[str], i: int, args: str, heading: Heading | None) -> Block:
    start = i + 1
    if not args.strip():
        raise TangleError(path, start, "#+begin_src without a language")
    lang, _, rest = args.strip().partition(" ")
    # Switches (-n, -r, -l "...") come before the first :header argument.
    colon = re.search(r"(?:^|[ \t]):", " " + rest)
    begin_args = rest[colon.start():].strip() if colon else ""
    name, name_line, header_lines = None, None, []
    j = i - 1
    while j >= 0 and (m := KEYWORD.match(lines[j])):
        key, value = m.group(1).lower(), (m.group(2) or "").rstrip(" \t")
        if key not in AFFILIATED and not key.startswith("attr_"):
            break
        if key in ("header", "headers"):
            header_lines.insert(0, (j + 1, value))
        elif key in ("name", "srcname") and name is None:
            # The nearest #+name wins, as in Org.
            name, name_line = value.strip(), j + 1
        j -= 1
    body: list[str] = []
    k = i + 1
    while k < len(lines) and not END_SRC.match(lines[k]):
        if HEADING.match(lines[k]):
            raise TangleError(path, k + 1, "a line starting with '*' inside a source block "
                              "ends the block in Org; escape it as ',*'")
        if BEGIN_SRC.match(lines[k]):
            # Org would tangle this line as code: almost always a lost #+end_src above it.
            raise TangleError(path, k + 1, f"#+begin_src inside the block of line {start} (is "
                              "its #+end_src missing?); escape a literal one as ',#+begin_src'")
        body.append(lines[k])
        k += 1
    if k >= len(lines):
        raise TangleError(path, start, "#+begin_src without #+end_src")
    body = normalize_body(path, start, ESCAPE.sub(r"\1\2", "\n".join(body)).split("\n") if body else [])
    return Block(start, k + 1, lang, begin_args, header_lines, name, name_line, body, heading)


def indentation(line: str) -> int:
    """The column where the text starts, tabs counted to the next multiple of 8 as in Emacs."""
    col = 0
    for ch in line:
        if ch == " ":
            col += 1
        elif ch == "\t":
            col = col // 8 * 8 + 8
        else:
            break
    return col


def normalize_body(path: Path, start: int, body: list[str]) -> list[str]:
    """Remove the common indentation, as `org-remove-indentation` does.

    Blank lines do not count; when anything is removed, blank lines become empty and the
    rest of each line's indentation is re-made with spaces (tabs become spaces).
    """
    n = min((indentation(s) for s in body if s.strip(" \t")), default=0)
    if n == 0:
        return body
    return ["" if not s.strip(" \t") else " " * (indentation(s) - n) + s.lstrip(" \t")
            for s in body]


def check_unique_names(path: Path, blocks: list[Block]) -> None:
    seen: dict[str, int] = {}
    for b in blocks:
        if b.name is None:
            continue
        if not b.name:
            raise TangleError(path, b.name_line, "#+name: without a name")
        if b.name in seen:
            raise TangleError(path, b.name_line,
                              f"duplicate #+name: {short(b.name)} (first at line {seen[b.name]})")
        seen[b.name] = b.name_line


# ---------------------------------------------------------------------------
# 2. Resolve header arguments, then expand noweb references
# ---------------------------------------------------------------------------

# Header arguments that change what is tangled, with the values this tool supports.
TANGLE_ARGS = {
    "tangle": None,                       # no | yes | a path
    "noweb": {"no", "yes", "tangle", "no-export", "strip-export", "eval"},
    "noweb-ref": None,
    "noweb-sep": None,
    "padline": {"yes", "no"},
    "mkdirp": {"yes", "no"},
    "shebang": None,
    "comments": {"no"},
}
# Header arguments that matter only to evaluation or export: accepted, ignored here.
OTHER_ARGS = {"exports", "results", "eval", "session", "cache", "hlines", "wrap", "file",
              "output-dir", "cmdline", "dir", "async", "python", "post", "colnames",
              "rownames", "sep", "file-ext", "no-expand", "width", "height",
              "inputs"}   # :inputs: files a frozen result depends on (results.py)
DEFAULTS = {"tangle": "no", "noweb": "no", "padline": "yes", "comments": "no"}
LANG_EXT = {"python": "py", "emacs-lisp": "el", "elisp": "el", "shell": "sh", "sh": "sh",
            "bash": "sh", "javascript": "js", "js": "js", "ruby": "rb", "perl": "pl",
            "c": "c", "c++": "cpp", "cpp": "cpp", "rust": "rs"}
# Which :noweb values expand references in a tangled block, and in a block it includes.
EXPANDS_WHEN_TANGLED = {"yes", "tangle", "no-export", "strip-export"}
EXPANDS_WHEN_INCLUDED = {"yes", "no-export", "strip-export", "eval"}
# Org's reference, `org-babel-noweb-wrap`: << then a non-blank, up to the nearest >> that a
# non-blank precedes. As a regexp searched along a line it is quadratic in the line's length
# (40,000 characters took 10 s); noweb_refs finds the same references in one pass. The
# regexp stays as the definition the tests check noweb_refs against.
NOWEB_REF = re.compile(r"(.*?)(<<([^ \t\n](?:.*?[^ \t\n])?)>>)")
REF_START = re.compile(r"<<[^ \t\n]")       # a name starts with a non-blank
REF_CLOSE = re.compile(r"(?<![ \t])>>")       # and ends with one
ONE_CHAR_REF = re.compile(r"<<([^ \t\n])>>")


def noweb_refs(text: str) -> list[tuple[int, int, str]]:
    """Every `<<name>>` of one line as (start, end, name), left to right, like NOWEB_REF.

    Org's regexp prefers a name of two characters or more: from a `<<`, the nearest `>>`
    at least two characters on that a non-blank precedes. Each search below starts where
    the last one ended, so the line is read once. When no such `>>` is left, none is left
    for any later `<<` either: only one-character names (`<<a>>`) can still match.
    """
    refs: list[tuple[int, int, str]] = []
    start = 0
    while m := REF_START.search(text, start):
        s = m.start()
        close = REF_CLOSE.search(text, s + 4)
        if close is None:
            refs += [(r.start(), r.end(), r.group(1)) for r in ONE_CHAR_REF.finditer(text, s)]
            break
        refs.append((s, close.end(), text[s + 2:close.start()]))
        start = close.end()
    return refs


def split_header_args(path: Path, line: int, text: str) -> list[tuple[str, str]]:
    """`:key value :key2 value2` -> [(key, value)], like org-babel-parse-header-arguments."""
    try:
        return list(header_args(text))
    except ValueError as e:
        raise TangleError(path, line, str(e)) from None


@functools.lru_cache(maxsize=4096)   # an inherited line is read once, not once per block
def header_args(text: str) -> tuple[tuple[str, str], ...]:
    """Org splits before every `:` that follows a blank, outside quotes and parentheses."""
    pieces, current, depth, quoted = [], [], 0, False
    for k, ch in enumerate(text):
        if ch == '"' and (k == 0 or text[k - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == ":" and not quoted and depth == 0 and (k == 0 or text[k - 1] in " \t"):
            pieces.append("".join(current))
            current = []
        current.append(ch)
    pieces.append("".join(current))
    if pieces[0].strip():
        raise ValueError(f"header arguments must start with ':', got {short(pieces[0].strip())!r}")
    args = []
    for piece in pieces[1:]:
        m = re.match(r":(\S+)(?:[ \t]+(.*))?$", piece.strip(), re.S)
        if not m:
            what = "a ':' without a name" if piece.strip() == ":" else repr(short(piece.strip()))
            raise ValueError(f"cannot read the header argument {what}; write ':name value'")
        key, value = m.group(1).lower(), (m.group(2) or "")
        args.append((key, read_value(key, value)))
    return tuple(args)


def read_value(key: str, value: str) -> str:
    """A header value as `org-babel-read` gives it: quotes removed, no Lisp evaluated."""
    if value[:1] in ("(", "'", "`"):
        raise ValueError(f":{key} {short(value)}: Emacs Lisp values are not supported")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        body = value[1:-1]
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)
    return value


def inherited_property(doc: Document, heading: Heading | None, name: str) -> str | None:
    """Org's `org-entry-get` with inheritance, including `NAME+` accumulation.

    Walking up from the block's heading, each level's values go in front of what was
    found below; the walk stops at a level with a plain NAME value; past the top, the
    file's #+PROPERTY value goes in front.
    """
    value = None
    h = heading
    while h is not None:
        base, plus = h.props.get(name, (None, []))
        here = [v for v in [base, *plus] if v is not None]
        if here:
            value = " ".join(here) + (" " + value if value is not None else "")
        if base is not None:
            return value
        h = h.parent
    top = doc.global_props.get(name)
    if top is not None:
        value = top + (" " + value if value is not None else "")
    return value


def resolve(doc: Document) -> None:
    """Every block's params: defaults < header-args < header-args:LANG < #+begin_src < #+header."""
    for b in doc.blocks:
        # Inherited arguments are reported at the block they reach.
        inherited = [(b.line, value) for name in ("header-args", f"header-args:{b.lang}")
                     if (value := inherited_property(doc, b.heading, name))]
        # Org merges the #+begin_src line, then the #+header lines from the last up: the
        # first #+header line wins over everything.
        own = [(b.line, b.begin_args), *reversed(b.header_lines)]
        params = dict(DEFAULTS)
        for k, (line, text) in enumerate(inherited + own):
            for key, value in split_header_args(doc.path, line, text):
                check_arg(doc.path, line, key, value)
                params[key] = value
                if k >= len(inherited):
                    b.own_args.add(key)
        b.params = params


def check_arg(path: Path, line: int, key: str, value: str) -> None:
    if key in OTHER_ARGS:
        return
    if key not in TANGLE_ARGS:
        known = ", ".join(sorted(TANGLE_ARGS) + sorted(OTHER_ARGS))
        raise TangleError(path, line, f"unsupported header argument :{key} (supported: {known})")
    allowed = TANGLE_ARGS[key]
    if allowed is not None and value not in allowed:
        raise TangleError(path, line, f":{key} {value!r} is not supported "
                          f"(use one of: {', '.join(sorted(allowed))})")
    if key in ("tangle", "noweb-ref") and not value:
        raise TangleError(path, line, f":{key} needs a value")
    if key == "shebang" and not value.startswith("#!"):
        raise TangleError(path, line, f":shebang {value!r} must start with '#!'")


@dataclass(frozen=True)
class Line:
    """One line of tangled text and the Org line it came from."""
    text: str
    org_line: int
    chunk: str


class Expander:
    """Expands `<<name>>` references the way org-babel-expand-noweb-references does."""

    def __init__(self, doc: Document):
        self.doc = doc
        live = [b for b in doc.blocks if not b.commented]
        self.named = {b.name: b for b in live if b.name}
        self.refs: dict[str, list[Block]] = {}
        for b in live:
            if ref := b.params.get("noweb-ref"):
                self.refs.setdefault(ref, []).append(b)
        for name, blocks in self.refs.items():
            if name in self.named:
                raise TangleError(doc.path, blocks[0].line,
                                  f":noweb-ref {name} is also the #+name of the block at line "
                                  f"{self.named[name].line}; Org would use only that one")

    def body(self, block: Block, expand: bool, stack: tuple[str, ...] = ()) -> list[Line]:
        lines = [Line(text, block.line + 1 + k, block.label) for k, text in enumerate(block.body)]
        if not lines:
            lines = [Line("", block.line, block.label)]
        if not expand:
            return lines
        out: list[Line] = []
        for line in lines:
            out.extend(self.expand_line(block, line, stack))
        return out

    def expand_line(self, block: Block, line: Line, stack: tuple[str, ...]) -> list[Line]:
        refs = noweb_refs(line.text)
        if not refs:
            return [line]
        out: list[Line] = []
        text: list[str] = []               # the line being built, in pieces (joined once)
        origin, end = line, 0
        for start, stop, name in refs:
            prefix = line.text[end:start]  # the text since the previous reference
            expansion = self.reference(block, line.org_line, name, stack)
            text += [prefix, expansion[0].text]
            origin = expansion[0]
            for e in expansion[1:]:
                out.append(Line("".join(text), origin.org_line, origin.chunk))
                text, origin = [prefix, e.text], e
            end = stop
        text.append(line.text[end:])
        out.append(Line("".join(text), origin.org_line, origin.chunk))
        return out

    def reference(self, parent: Block, org_line: int, name: str, stack: tuple[str, ...]) -> list[Line]:
        if name in stack:
            cycle = " -> ".join(short(n) for n in stack[stack.index(name):] + (name,))
            raise TangleError(self.doc.path, org_line, f"noweb reference cycle: {cycle}")
        if name in self.named:
            blocks = [self.named[name]]
        elif name in self.refs:
            blocks = self.refs[name]
        else:
            raise TangleError(self.doc.path, org_line,
                              f"unknown noweb reference <<{short(name)}>> (no #+name: or :noweb-ref "
                              f"{short(name)})")
        out: list[Line] = []
        for k, child in enumerate(blocks):
            if child.params["noweb"] == "tangle" and any(noweb_refs(s) for s in child.body):
                raise TangleError(self.doc.path, child.line,
                                  f"<<{name}>> is used inside another block, where Org leaves the "
                                  "references of a ':noweb tangle' block unexpanded; use ':noweb yes'")
            body = self.body(child, child.params["noweb"] in EXPANDS_WHEN_INCLUDED, stack + (name,))
            if k == 0:
                out = body
            else:
                out = join_lines(out, blocks[k - 1].params.get("noweb-sep", "\n"), body)
        return out


def join_lines(a: list[Line], sep: str, b: list[Line]) -> list[Line]:
    """a + sep + b as text, keeping each line's origin."""
    parts = sep.split("\n")
    out = a[:-1]
    cur = Line(a[-1].text + parts[0], a[-1].org_line, a[-1].chunk)
    for p in parts[1:]:
        out.append(cur)
        cur = Line(p, b[0].org_line, b[0].chunk)
    out.append(Line(cur.text + b[0].text, cur.org_line if cur.text else b[0].org_line,
                    cur.chunk if cur.text else b[0].chunk))
    return out + b[1:]


def org_trim(lines: list[Line]) -> list[Line]:
    """`org-trim`: Org strips blanks at both ends of a tangled block."""
    ws = " \t\r"
    while lines and not lines[0].text.strip(ws):
        lines = lines[1:]
    while lines and not lines[-1].text.strip(ws):
        lines = lines[:-1]
    if not lines:
        return []
    first, last = lines[0], lines[-1]
    lines = [Line(first.text.lstrip(ws), first.org_line, first.chunk)] + lines[1:]
    last = lines[-1]
    lines[-1] = Line(last.text.rstrip(ws), last.org_line, last.chunk)
    return lines


@dataclass
class Output:
    """One file to write: its text, mode and source map (one entry per line)."""
    path: str                      # relative to the Org file's folder
    lines: list[Line] = field(default_factory=list)
    executable: bool = False
    mkdirp: bool = False
    first_line: int = 0            # the first block's line, for errors

    @property
    def text(self) -> str:
        return "".join(line.text + "\n" for line in self.lines)


def target_of(doc: Document, b: Block) -> str | None:
    tangle = b.params["tangle"]
    if tangle == "no":
        return None
    if tangle == "yes":
        return f"{doc.path.stem}.{LANG_EXT.get(b.lang, b.lang)}"
    return tangle


# What tangle never writes (nor removes), whatever a block or the manifest says: git's files,
# the Org file, the literate tools and tangle's manifest. Names are compared in lower case:
# on macOS and Windows `LLM.org` is `llm.org`.
TOOLS = ("literate.py", "tangle.py", "weave.py", "results.py", "web.py", "notebooks.py")
# The Makefile only by a block that names it itself (see check_target).
MAKEFILES = ("makefile", "gnumakefile")


def path_problem(org: Path, rel) -> str | None:
    """Why `rel` (relative to the Org file's folder) may never be written or removed, or None.

    One rule for a block's target and for an entry of the manifest, so a damaged manifest
    cannot make tangle remove a file it would never have written.
    """
    if not isinstance(rel, str) or not rel.strip():
        return "is not a file name"
    if "\0" in rel:
        return "contains a NUL byte"
    if any(c.isspace() for c in rel):       # most likely a header run into the value
        return "has a space in it (not supported; is a header argument missing its ' :'?)"
    p = Path(rel)
    if p.is_absolute() or rel.startswith("~"):
        return "absolute paths are refused; use a path relative to the Org file"
    if ".." in p.parts:
        return "'..' leaves the Org file's folder"
    if rel.split("/")[-1] in ("", "."):
        return "names a folder, not a file"
    low = p.as_posix().lower()
    if ".git" in low.split("/"):
        return "is inside .git/, which belongs to git"
    if low == org.name.lower():
        return "would overwrite the Org file"
    if low == manifest_path(org).name.lower():
        return "is tangle's own manifest"
    if low in TOOLS:
        return "is one of the literate tools"
    root = org.resolve().parent
    try:
        real = (root / p).resolve()
        if root != real and root not in real.parents:
            return f"leads outside the Org file's folder through a symlink (to {short(str(real))})"
        if real == org.resolve():
            return "would overwrite the Org file"
        if (root / p).is_dir():
            return "is a folder, not a file"
    except (OSError, RuntimeError, ValueError) as e:   # too long, a symlink loop, ...
        return f"is not a usable file name ({getattr(e, 'strerror', None) or e})"
    return None


def check_target(doc: Document, b: Block, target: str, seen: dict | None = None) -> str:
    """A target stays inside the Org file's folder, is a file, and is none of TOOLS & co."""
    seen = {} if seen is None else seen
    if target not in seen:
        seen[target] = path_problem(doc.path, target)
    if why := seen[target]:
        raise TangleError(doc.path, b.line, f":tangle {short(target)}: {why}")
    rel = Path(target).as_posix()
    if rel.lower() in MAKEFILES and "tangle" not in b.own_args:
        raise TangleError(doc.path, b.line, f":tangle {rel} is inherited here; the Makefile is "
                          "written only by a block that names it on its own #+begin_src or "
                          "#+header line")
    return rel


def check_outputs(doc: Document, outputs: dict[str, Output]) -> None:
    """The targets together, and against the disk: every write will succeed, or none is made.

    No two targets may be one file on a case-insensitive disk, no target may need a folder
    where another target or an existing file is, and every folder must exist or be made.
    """
    root = doc.path.resolve().parent
    seen: dict[str, Output] = {}
    for rel, out in outputs.items():          # document order
        if (other := seen.get(rel.lower())) is not None:
            raise TangleError(doc.path, out.first_line, f":tangle {rel}: differs from {other.path} "
                              f"(line {other.first_line}) only in letter case, and is the same "
                              "file on macOS and Windows")
        seen[rel.lower()] = out
    for rel, out in outputs.items():
        for folder in reversed(Path(rel).parents[:-1]):   # build, build/llm, ...
            name = folder.as_posix()
            if (other := seen.get(name.lower())) is not None:
                raise TangleError(doc.path, out.first_line, f":tangle {rel}: needs a folder "
                                  f"{name}, which line {other.first_line} tangles as a file")
            try:
                is_file = (root / folder).exists() and not (root / folder).is_dir()
            except OSError as e:
                raise TangleError(doc.path, out.first_line, f":tangle {short(rel)}: "
                                  f"{e.strerror or e}") from None
            if is_file:
                raise TangleError(doc.path, out.first_line, f":tangle {rel}: {name} is a file, "
                                  "not a folder")
        if not out.mkdirp and not (root / rel).parent.is_dir():
            raise TangleError(doc.path, out.first_line, f"the folder of {out.path} does not exist; "
                              "add ':mkdirp yes' to create it")


COMPILED: set[bytes] = set()   # hashes of (file, text) that compiled, in this process


def check_compiles(doc: Document, outputs: dict[str, Output]) -> None:
    """Every tangled .py must compile (in memory: compile(), nothing imported or run).

    A stray or missing #+begin_src/#+end_src line moves prose into code or code out of
    its file; the result is rarely valid Python. The error names the Org line of the
    offending line, found through the source map.
    """
    for rel, out in outputs.items():
        if not rel.endswith(".py"):
            continue
        text = out.text
        key = hashlib.sha256(f"{rel}\0{text}".encode("utf-8", "surrogatepass")).digest()
        if key in COMPILED:                          # weave and results tangle again
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # SyntaxWarning: not our business here
                compile(text, rel, "exec", dont_inherit=True)
        except SyntaxError as e:                     # IndentationError, TabError too
            n = min(max(e.lineno or 1, 1), len(out.lines))
            line = out.lines[n - 1] if out.lines else Line("", out.first_line, rel)
            raise TangleError(doc.path, line.org_line, f"{rel}:{n} would not compile: {e.msg} "
                              f"(in ⟨{short(line.chunk)}⟩)") from None
        except (ValueError, RecursionError, MemoryError) as e:   # a NUL byte, too deep
            bad = next((x for x in out.lines if "\0" in x.text), None)
            raise TangleError(doc.path, bad.org_line if bad else out.first_line,
                              f"{rel} would not compile: {e}") from None
        if len(COMPILED) > 1000:
            COMPILED.clear()
        COMPILED.add(key)


def tangle_document(doc: Document, compile_check: bool = True) -> dict[str, Output]:
    """Every output file, in memory and checked. Raises TangleError before anything is written."""
    resolve(doc)
    expander = Expander(doc)
    live = [b for b in doc.blocks if not b.commented and b.params["tangle"] != "no"]
    outputs: dict[str, Output] = {}
    problems: dict[str, str | None] = {}    # each target is looked at on disk once
    for b in live:  # document order, whatever the language (Org 9.5)
        target = check_target(doc, b, target_of(doc, b), problems)
        out = outputs.setdefault(target, Output(target, first_line=b.line))
        expand = b.params["noweb"] in EXPANDS_WHEN_TANGLED
        lines = org_trim(expander.body(b, expand)) or [Line("", b.line, b.label)]
        if shebang := b.params.get("shebang"):
            if not out.executable:
                lines = [Line(shebang, b.line, b.label)] + lines
            out.executable = True
        if out.lines and b.params["padline"] != "no":
            lines = [Line("", b.line, b.label)] + lines
        out.lines.extend(lines)
        out.mkdirp = out.mkdirp or b.params.get("mkdirp", "no") == "yes"
    check_outputs(doc, outputs)
    if compile_check:
        check_compiles(doc, outputs)
    return outputs


# ---------------------------------------------------------------------------
# 3. Write: all-or-nothing, unchanged files untouched, a manifest and a source map
# ---------------------------------------------------------------------------

IGNORED_EXTRA = ("__pycache__", ".pytest_cache", ".egg-info", ".pyc")


def manifest_path(org: Path) -> Path:
    """`.llm.tangle.json` beside llm.org: the files tangle wrote and their source map."""
    return org.resolve().parent / f".{org.stem}.tangle.json"


def load_manifest(org: Path) -> dict:
    try:
        return json.loads(manifest_path(org).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {"files": {}}


def file_mode(out: Output) -> int:
    return 0o755 if out.executable else 0o644


def write_temp(path: Path, data: bytes, mode: int) -> Path:
    """`data` in a temporary file beside `path`, ready to be renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file in the same folder and rename: never a partial file."""
    tmp = write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_generated_folder(out: Path, marker: str, tool: str) -> None:
    """`out` is absent, or a folder `tool` wrote (it holds `marker`): nothing else is replaced."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not (out.is_dir() and (out / marker).is_file())):
        raise TangleError(out, None, f"exists and was not written by {tool}: move it away "
                          "or choose another folder with -o")


def generated_folder_main(argv: list[str] | None, tool: str, description: str, folder: str,
                          build, marker: str, suffix: str, noun: str) -> int:
    """The command line of a tool that writes a whole folder from an Org file (web.py,
    notebooks.py): refuse a folder it did not make, build, write all or nothing."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog=tool, description=description)
    parser.add_argument("org", nargs="?", default=Path("llm.org"), type=Path,
                        help="the Org file (default: llm.org)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help=f"the folder to write (default: {folder}/ beside the Org file)")
    args = parser.parse_args(argv)
    out = args.output or args.org.resolve().parent / folder
    try:
        check_generated_folder(out, marker, tool)
        files = build(args.org)
        write_folder(out, files, marker)
    except TangleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}/ ({sum(f.endswith(suffix) for f in files)} {noun})")
    return 0


def write_folder(out: Path, files: dict[str, bytes], marker: str) -> None:
    """Replace the folder `out` by exactly `files` (relative path -> bytes), all or nothing.

    Written into a temporary sibling, then renamed into place; the old folder (one with
    `marker`, see check_generated_folder) is removed only once the new one is there.
    """
    import shutil
    import tempfile
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        for rel, data in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o644)
        tmp.chmod(0o755)
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def previous_targets(org: Path) -> list[str]:
    """The files the last tangle wrote, from its manifest, each checked as a target is.

    Tangle removes a file only because the manifest lists it, so an entry that no block
    could have written (`../x`, `.git/config`, `llm.org`, a folder) stops everything.
    """
    mp = manifest_path(org)
    files = load_manifest(org).get("files")
    if not isinstance(files, dict):
        raise TangleError(mp, None, "is damaged (no list of files); delete it and tangle again")
    for rel in files:
        if why := path_problem(org, rel):
            raise TangleError(mp, None, f"lists {short(rel)!r}, which tangle never writes: {why}. "
                              f"Nothing was removed; if {mp.name} is damaged, delete it and "
                              "tangle again")
    return sorted(files)


def status(org: Path, outputs: dict[str, Output]) -> dict[str, list[str]]:
    """Which targets are stale (content or mode differ), missing, or extra on disk."""
    root = org.resolve().parent
    stale, missing = [], []
    for rel, out in outputs.items():
        p = root / rel
        if not p.exists():
            missing.append(rel)
        elif p.read_bytes() != out.text.encode() or (p.stat().st_mode & 0o777) != file_mode(out):
            stale.append(rel)
    extra = set(f for f in previous_targets(org) if f not in outputs and (root / f).exists())
    # Files nobody tangled, in the folders tangle owns (a hand-made build/llm/x.py).
    tops = {Path(rel).parts[0] for rel in outputs if len(Path(rel).parts) > 1}
    for top in tops:
        for p in (root / top).rglob("*"):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in outputs and not any(s in rel for s in IGNORED_EXTRA):
                extra.add(rel)
    return {"stale": sorted(stale), "missing": sorted(missing), "extra": sorted(extra)}


def write_outputs(org: Path, outputs: dict[str, Output], allow_empty: bool = False) -> list[str]:
    """Write what changed, remove what tangle wrote before and no longer makes.

    All or nothing: every changed file is first written to a temporary beside it (and
    every missing folder made); only when all of them are there are they renamed into
    place. A failure before that (a full disk) removes the temporaries and the new
    folders, and leaves every file as it was.
    """
    root = org.resolve().parent
    old = previous_targets(org)
    gone = [rel for rel in old if rel not in outputs and (root / rel).is_file()]
    if gone and not any(rel in outputs for rel in old) and not allow_empty:
        listed = ", ".join(gone[:3]) + (", ..." if len(gone) > 3 else "")
        raise TangleError(org, None, f"tangles none of the {len(gone)} files it made last time "
                          f"({listed}) and would remove them all; if that is meant, run "
                          "again with --allow-empty")
    changed = []
    for rel, out in sorted(outputs.items()):
        p = root / rel
        data = out.text.encode()
        if p.exists() and p.read_bytes() == data and (p.stat().st_mode & 0o777) == file_mode(out):
            continue  # unchanged: keep the mtime, so make and pytest caches stay warm
        changed.append((rel, p, data, file_mode(out)))
    made: list[Path] = []             # folders this call created, outermost first
    staged: list[tuple[Path, Path]] = []
    try:
        for rel, p, data, mode in changed:
            missing = [d for d in [p.parent, *p.parent.parents] if not d.exists()]
            for d in reversed(missing):
                d.mkdir()
                made.append(d)
            staged.append((write_temp(p, data, mode), p))
    except OSError as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        raise TangleError(org, None, f"cannot write {rel}: {e.strerror or e}; "
                          "nothing was changed") from None
    for tmp, p in staged:
        os.replace(tmp, p)
    written = [rel for rel, *_ in changed]
    for rel in gone:
        if Path(rel).name.lower() in MAKEFILES:   # it might be the user's now: leave it
            written.append(f"{rel} (no longer tangled; left in place)")
            continue
        try:
            (root / rel).unlink()
        except OSError as e:
            raise TangleError(org, None, f"cannot remove {rel}, which it no longer tangles: "
                              f"{e.strerror or e}") from None
        written.append(f"{rel} (removed)")
    manifest = {
        "source": org.name,
        "files": {rel: {"sha256": hashlib.sha256(out.text.encode()).hexdigest(),
                        "map": [[line.org_line, line.chunk] for line in out.lines]}
                  for rel, out in sorted(outputs.items())},
    }
    data = json.dumps(manifest, indent=0, sort_keys=True).encode()
    mp = manifest_path(org)
    if not mp.exists() or mp.read_bytes() != data:
        atomic_write(mp, data, 0o644)
    return written


def where(org: Path, spec: str) -> str:
    """`build/llm/x.py:12` -> `llm.org:345 ⟨chunk⟩`, from a fresh tangle in memory."""
    m = re.match(r"(.+):(\d+)$", spec)
    if not m:
        raise TangleError(org, None, f"where: expected FILE:LINE, got {spec!r}")
    root = org.resolve().parent
    target, lineno = Path(m.group(1)), int(m.group(2))
    try:
        rel = target.resolve().relative_to(root).as_posix()
    except ValueError:
        rel = target.as_posix()
    outputs = tangle_document(parse(org), compile_check=False)
    if rel not in outputs:
        raise TangleError(org, None, f"where: {rel} is not tangled from {org.name} "
                          f"(its files: {', '.join(sorted(outputs))})")
    lines = outputs[rel].lines
    if not 1 <= lineno <= len(lines):
        raise TangleError(org, None, f"where: {rel} has {len(lines)} lines, not {lineno}")
    line = lines[lineno - 1]
    return f"{org.name}:{line.org_line} ⟨{line.chunk}⟩"
