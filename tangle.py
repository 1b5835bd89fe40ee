#!/usr/bin/env python3
"""tangle.py: the literate tool of this book.

    python tangle.py [tangle] llm.org      write the code blocks of llm.org to their files
    python tangle.py --check llm.org       exit 1 if the files on disk differ (writes nothing)
    python tangle.py where build/llm/x.py:LINE   which llm.org line made that line
    python tangle.py weave llm.org         the book: llm.org -> pdf/llm.pdf

Every tangled .py must compile (--no-compile-check for Org files whose .py blocks are not
Python), and a tangle that would remove every file the last one wrote needs --allow-empty.

The semantics are Emacs Org 9.x org-babel's (`org-babel-tangle`), so an Emacs user
who presses C-c C-v t gets the same files. Where Org would silently do something
surprising (expand an unknown <<reference>> to nothing, loop forever on a cycle,
treat an unterminated block as prose), this tool stops with `FILE:LINE: message`
and writes nothing.

This file is the command line only. The work is done by literate.py, the core that
weave.py and results.py build on too: parse, resolve header arguments, expand noweb,
check every target, write all-or-nothing, keep the source map. The weave is imported
only when the `weave` verb asks for it, so the tools import one way, never in a circle.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The core: parse, resolve, noweb, targets, writes, the source map. Its names are also
# tangle's (tangle.parse, tangle.load_manifest, ...), as they were before it was split out.
from literate import *  # noqa: F401,F403
from literate import TangleError, parse, status, tangle_document, where, write_outputs

# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbs = ("tangle", "weave", "where")
    verb = argv.pop(0) if argv and argv[0] in verbs else "tangle"
    parser = argparse.ArgumentParser(
        prog=f"tangle.py {verb}",
        description={"tangle": "Write the code blocks of an Org file to their :tangle files.",
                     "weave": "Turn the Org file into the book, pdf/<name>.pdf.",
                     "where": "Name the Org line that produced a line of a tangled file."}[verb],
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]) if verb == "tangle" else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if verb == "where":
        parser.add_argument("spec", metavar="FILE:LINE", help="a tangled file and a line number")
        parser.add_argument("--org", default="llm.org", type=Path, help="the Org file (default: llm.org)")
    else:
        parser.add_argument("org", nargs="?", default=Path("llm.org"), type=Path,
                            help="the Org file (default: llm.org)")
    if verb == "tangle":
        parser.add_argument("--check", action="store_true",
                            help="write nothing; exit 1 listing stale, missing and extra files")
        parser.add_argument("--allow-empty", action="store_true",
                            help="let one tangle remove every file the previous one wrote "
                                 "(refused otherwise: an emptied or broken Org file)")
        parser.add_argument("--no-compile-check", dest="compile_check", action="store_false",
                            help="write .py targets even when they do not compile as Python "
                                 "(for Org files whose .py blocks are not Python)")
    if verb == "weave":
        parser.add_argument("-o", "--output", type=Path, help="the PDF to write (default: pdf/NAME.pdf)")
        parser.add_argument("--typst", action="store_true", help="also keep the Typst source beside the PDF")
    args = parser.parse_args(argv)
    try:
        if verb == "where":
            print(where(args.org, args.spec))
            return 0
        if verb == "weave":
            import weave  # only here: weave builds on the core, tangle.py is just the door
            return weave.main(args)
        outputs = tangle_document(parse(args.org), compile_check=args.compile_check)
        if args.check:
            s = status(args.org, outputs)
            problems = [f"{kind}: {f}" for kind in ("stale", "missing", "extra") for f in s[kind]]
            for p in problems:
                print(p)
            if problems:
                print(f"{args.org}: the tangled files differ from the Org file; run `make tangle` "
                      "(and move any hand edit into the Org file)", file=sys.stderr)
            return 1 if problems else 0
        written = write_outputs(args.org, outputs, allow_empty=args.allow_empty)
        for f in written:
            print(f"wrote {f}")
        return 0
    except TangleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
