"""tested_by.py: which tests run which block of the book's code.

    python tested_by.py [llm.org]    run the test suite under coverage.py and record, for
                                     every tangled Python block, the tests that ran it,
                                     in pdf/tested-by.json (`make tested-by`)

The suite runs once under coverage.py with a context per test: tests/conftest.py names
the running test to coverage (its pytest node id) and, through the environment, to every
Python process the test starts (the CLI run by subprocess, torchrun's workers, the result
blocks), which coverage starts measuring itself from the .pth file it installs. Each line
of build/ that a test ran is traced back through tangle's source map to the llm.org block
it came from. Only lines inside a function body count: the other lines (imports, `def`
lines, constants, class fields) run whenever a module is imported, by any test or none.

The record holds the sha256 of the tangled Python it was measured on and, per block, the
sha256 of the block's own text. The weave reads the record (it needs no coverage.py):
a block whose text changed since is printed as not measured rather than with old links,
and `make test` fails while the record does not match the code (tests/test_tested_by.py).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import literate
from literate import TangleError

DATA = "pdf/tested-by.json"
PARAMS = re.compile(r"\[.*\]$")          # test_y[a-b]: the parameters of one case

# coverage.py's settings for the run. `context` is read from the environment when a process
# starts: empty in pytest's own process (conftest switches the context per test there),
# the running test's node id in every process a test starts.
RC = """\
[run]
data_file = {data}
parallel = true
source = {source}
context = ${{TESTED_BY_TEST-}}
sigterm = true
"""


# ---------------------------------------------------------------------------
# What the record is about: the tangled Python and its blocks
# ---------------------------------------------------------------------------

def code_hash(outputs: dict[str, literate.Output]) -> str:
    """sha256 of every tangled .py file, names and text, in name order."""
    h = hashlib.sha256()
    for rel in sorted(outputs):
        if rel.endswith(".py"):
            h.update(f"{rel}\0{outputs[rel].text}\0".encode())
    return h.hexdigest()


def block_hash(b: literate.Block) -> str:
    """sha256 of a block's own text, as the book prints it."""
    return hashlib.sha256("\n".join(b.body).encode()).hexdigest()[:16]


def function_lines(text: str) -> set[int]:
    """The lines of a module that are inside a function's body (not run by an import)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
        elif isinstance(node, ast.Lambda):
            lines.update(range(node.body.lineno, (node.body.end_lineno or node.body.lineno) + 1))
    return lines


def python_blocks(doc: literate.Document, outputs: dict[str, literate.Output]
                  ) -> dict[int, tuple[literate.Block, str, list[tuple[str, int]]]]:
    """Each block that tangles Python lines of its own: begin line -> (block, file, lines).

    The lines are (file, line number) of the tangled lines the source map traces to the
    block's own text (a `<<reference>>` line belongs to the block it brings in)."""
    at = {}
    for b in doc.blocks:
        if not b.commented:
            for k in range(b.line + 1, b.end_line):
                at[k] = b
    out: dict[int, tuple[literate.Block, str, list[tuple[str, int]]]] = {}
    for rel, o in outputs.items():
        if not rel.endswith(".py"):
            continue
        for n, line in enumerate(o.lines, 1):
            b = at.get(line.org_line)
            if b is not None:
                out.setdefault(b.line, (b, rel, []))[2].append((rel, n))
    return dict(sorted(out.items()))


def test_name(nodeid: str) -> str:
    """`tests/test_x.py::test_y[a-b]` -> `test_x.py::test_y`: a test with all its parameters."""
    path, _, rest = nodeid.partition("::")
    return f"{Path(path).name}::{PARAMS.sub('', rest)}" if rest else Path(path).name


# ---------------------------------------------------------------------------
# Measure: the suite under coverage.py
# ---------------------------------------------------------------------------

def per_test_context():
    """The pytest hook a conftest.py takes (`pytest_runtest_protocol = per_test_context()`).

    When tested_by.py runs the suite (TESTED_BY_RC is set and coverage.py is measuring),
    it names each test to coverage.py: in pytest's own process as a dynamic context, and in
    every Python process the test starts through the environment (COVERAGE_PROCESS_START
    makes coverage's .pth file start measuring there; the RC file reads TESTED_BY_TEST)."""
    import pytest

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        rc = os.environ.get("TESTED_BY_RC")
        cov = None
        if rc:
            import coverage
            cov = coverage.Coverage.current()
        if cov is None:
            yield
            return
        os.environ["TESTED_BY_TEST"] = item.nodeid
        os.environ["COVERAGE_PROCESS_START"] = rc
        cov.switch_context(item.nodeid)
        try:
            yield
        finally:
            cov.switch_context("")
            os.environ.pop("TESTED_BY_TEST", None)
            os.environ.pop("COVERAGE_PROCESS_START", None)
    return pytest_runtest_protocol


def measure(org: Path, pytest_args: list[str] | None = None) -> tuple[dict, float]:
    """Run the tests under coverage.py; the record (as written to pdf/tested-by.json) and the
    seconds the run took. The tangled files on disk must be what `org` makes."""
    org = Path(org)
    root = org.resolve().parent
    doc = literate.parse(org)
    outputs = literate.tangle_document(doc)
    s = literate.status(org, outputs)
    if s["stale"] or s["missing"]:
        raise TangleError(org, None, "the tangled files differ from the Org file ("
                          + ", ".join(s["stale"] + s["missing"]) + "): run `make tangle` first")
    try:
        import coverage  # noqa: F401
    except ImportError:
        raise TangleError(org, None, "coverage.py is not installed: `make setup` installs it "
                          "(requirements.txt)") from None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tested-by-") as tmp:
        rc = Path(tmp) / "coveragerc"
        data = Path(tmp) / "coverage"
        data.mkdir()
        source = sorted({str((root / rel).resolve().parent) for rel in outputs if rel.endswith(".py")})
        rc.write_text(RC.format(data=data / ".coverage", source=", ".join(source)))
        env = {k: v for k, v in os.environ.items()
               if k not in ("TESTED_BY_TEST", "COVERAGE_PROCESS_START", "COVERAGE_PROCESS_CONFIG")}
        env["TESTED_BY_RC"] = str(rc)           # tests/conftest.py: name each test to coverage
        cmd = [sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", "-q",
               *(pytest_args or ["tests"])]
        run = subprocess.run(cmd, cwd=root, env=env)
        if run.returncode not in (0, 1):        # 1: some tests failed, the rest still ran
            raise TangleError(org, None, f"pytest could not run the tests (exit {run.returncode})")
        record = record_from(org, doc, outputs, rc, data)
    record["complete"] = True
    record["failed"] = run.returncode != 0
    return record, time.monotonic() - started


def record_from(org: Path, doc: literate.Document, outputs: dict[str, literate.Output],
                rc: Path, data: Path) -> dict:
    """The record, from the coverage data files a run left in the folder `data`."""
    from coverage import Coverage
    root = org.resolve().parent
    cov = Coverage(config_file=str(rc))
    cov.combine([str(data)])
    measured = cov.get_data()
    files = {os.path.realpath(f): f for f in measured.measured_files()}
    blocks = python_blocks(doc, outputs)
    tests: dict[int, set[str]] = {line: set() for line in blocks}
    statements: dict[int, int] = {line: 0 for line in blocks}
    owner = {(rel, n): line for line, (_, _, lines) in blocks.items() for rel, n in lines}
    for rel, o in sorted(outputs.items()):
        if not rel.endswith(".py"):
            continue
        path = os.path.realpath(root / rel)
        body = function_lines(o.text)
        for n in cov.analysis2(path)[1]:
            if n in body and (rel, n) in owner:
                statements[owner[rel, n]] += 1
        if path not in files:
            continue
        for n, contexts in measured.contexts_by_lineno(files[path]).items():
            if n in body and (rel, n) in owner:
                tests[owner[rel, n]] |= {test_name(c) for c in contexts if c}
    return {
        "about": "Written by `make tested-by` (tested_by.py): for each tangled Python block of "
                 f"{org.name}, the tests that ran a line of its function bodies.",
        "source": org.name,
        "code": code_hash(outputs),
        "tests measured": len({test_name(c) for c in measured.measured_contexts() if c}),
        "blocks": [{"chunk": b.label, "file": rel, "code": block_hash(b),
                    "statements": statements[line], "tests": sorted(tests[line])}
                   for line, (b, rel, _) in blocks.items()],
    }


# ---------------------------------------------------------------------------
# Read: what the weave prints and the test suite checks
# ---------------------------------------------------------------------------

@dataclass
class Entry:
    """What the record says about one block of the book as it is now."""
    state: str                      # tested | untested | import | stale
    tests: list[str] = field(default_factory=list)
    statements: int = 0             # its own lines inside function bodies


@dataclass
class Record:
    path: Path
    current: bool                   # measured on the tangled code as it is now
    complete: bool                  # the whole suite ran (not an interrupted run)
    measured: int                   # how many tests ran (a parametrized test counts once)
    entries: dict[int, Entry]       # block's begin line -> its entry
    changed: list[literate.Block]   # blocks whose text is not the one measured
    tests: dict[str, list[int]]     # test -> the begin lines of the blocks it ran


def load(doc: literate.Document, outputs: dict[str, literate.Output]) -> Record | None:
    """The record beside the Org file, matched to its blocks now (None if there is none)."""
    path = doc.path.resolve().parent / DATA
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        recorded = {(e["chunk"], e["file"], e["code"]): e for e in data["blocks"]}
        current = data["code"] == code_hash(outputs)
        complete, measured = bool(data.get("complete", True)), int(data.get("tests measured", 0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TangleError(path, None, f"unreadable ({e}): run `make tested-by`") from None
    entries, changed, tests = {}, [], {}
    blocks = python_blocks(doc, outputs)
    for line, (b, rel, _) in blocks.items():
        e = recorded.get((b.label, rel, block_hash(b)))
        if e is None:
            entries[line] = Entry("stale")
            changed.append(b)
            continue
        state = "tested" if e["tests"] else "untested" if e["statements"] else "import"
        entries[line] = Entry(state, list(e["tests"]), e["statements"])
        for t in e["tests"]:
            tests.setdefault(t, []).append(line)
    # A block whose function body is all in chunks it references (`def f(): <<f-body>>`)
    # is run by the tests that run those chunks.
    expander = literate.Expander(doc)
    for line, (b, _, _) in blocks.items():
        if entries[line].state != "import":
            continue
        inner = [entries[c.line] for c in referenced(b, expander) if c.line in entries]
        if any(e.state == "stale" for e in inner):
            entries[line] = Entry("stale")
        elif any(e.statements for e in inner):
            runs = sorted({t for e in inner for t in e.tests})
            entries[line] = Entry("tested" if runs else "untested", runs)
    return Record(path, current, complete, measured, entries, changed, tests)


def referenced(b: literate.Block, expander: literate.Expander) -> list[literate.Block]:
    """The blocks b brings in through <<references>>, and theirs, each once."""
    seen: dict[int, literate.Block] = {}
    todo = [b]
    while todo:
        for text in todo.pop().body:
            for _, _, name in literate.noweb_refs(text):
                for c in ([expander.named[name]] if name in expander.named
                          else expander.refs.get(name, [])):
                    if c.line not in seen and c is not b:
                        seen[c.line] = c
                        todo.append(c)
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="tested_by.py", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("org", nargs="?", default="llm.org", type=Path)
    parser.add_argument("pytest_args", nargs="*", metavar="PYTEST_ARG",
                        help="what pytest runs (default: tests)")
    args = parser.parse_args(argv)
    try:
        record, seconds = measure(args.org, args.pytest_args)
    except TangleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run_failed = record.pop("failed")
    out = args.org.resolve().parent / DATA
    literate.atomic_write(out, (json.dumps(record, indent=1) + "\n").encode(), 0o644)
    if run_failed:
        print(f"error: some tests failed; {DATA} was written from what ran, but fix them and "
              "run `make tested-by` again", file=sys.stderr)
    blocks = record["blocks"]
    tested = sum(1 for b in blocks if b["tests"])
    untested = sum(1 for b in blocks if b["statements"] and not b["tests"])
    print(f"wrote {DATA}: {len(blocks)} blocks, {tested} run by tests, {untested} by none, "
          f"{len(blocks) - tested - untested} with no function body; {seconds:.0f} s "
          f"(load average {os.getloadavg()[0]:.1f})")
    return 1 if run_failed else 0


if __name__ == "__main__":
    sys.exit(main())
