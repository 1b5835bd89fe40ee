"""results.py: numbers, tables and figures in the book, computed by the book's own code.

    python results.py [llm.org] [NAME...]   recompute the frozen results (all, or NAME...)
                                            and record them under pdf/results/
    python results.py --check [llm.org]     exit 1 if a number the prose states is not what
                                            the code computes, or a result is missing

A result is a named Python block with `:results value`; it assigns `result` (a number, a
string, a dict of them, or a table as a list of rows) and may save a figure to
`figure_path`. With `:results output` (as in org-babel) the result is what the block
prints: the book shows the code and, where `[[result:NAME]]` stands alone, its output (a
block that also assigns a dict `result` gets the output as its key "output"). With `:cache yes` it is frozen: `make results` runs it and records its value
under pdf/results/NAME.json with the sha256 of its code and of the files named by
`:inputs`; the weave reads the record and warns when those hashes no longer match. Without,
it is cheap and runs at every weave and every test. The prose cites a value with
`[[result:NAME.KEY][as written]]`: the description is what an Org reader sees, and it is
also the format (digits, separators, a k/M/G/T or % suffix) the weave prints the value in,
so a stale number cannot hide.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import literate
from literate import TangleError

RESULTS_DIR = "pdf/results"
# [[result:NAME.KEY]] or [[result:NAME.KEY][description]], not inside =verbatim= or ~code~.
# A link not inside =verbatim= or ~code~; the test of the character before it is made in
# citations(), so that the search can jump from one `[[result:` to the next.
# A description stops at the next `[[`, so a run of unclosed links costs linear time.
LINK = re.compile(r"\[\[result:([^\]\[]+)\](?:\[((?:[^\]\[]|\[(?!\[)|\](?!\]))*)\])?\]")
NUMBER = re.compile(r"^(-?)(\d{1,3}(?:,\d{3})+|\d*)(?:\.(\d+))?(\s?[kMGT]|%)?$")
SCALE = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "%": 1e-2}

# Runs in a fresh interpreter with build/ on sys.path: each block in its own namespace.
RUNNER = r"""
import contextlib, io, json, os, sys, traceback
jobs = json.load(open(sys.argv[1]))
out = {}
for job in jobs:
    ns = {"__name__": "__result__", "figure_path": job["figure"]}
    printed = io.StringIO()
    try:
        # Padded so that a traceback's line numbers are the Org file's.
        code = compile("\n" * job["line"] + job["code"], job["file"], "exec")
        with contextlib.redirect_stdout(printed) if job["output"] else contextlib.nullcontext():
            exec(code, ns)
        if job["output"]:   # what it printed; with numbers for the prose, a dict of both
            extra = ns.get("result")
            ns["result"] = ({**extra, "output": printed.getvalue()} if isinstance(extra, dict)
                            else printed.getvalue())
        if "result" not in ns and not os.path.exists(job["figure"]):
            raise NameError("the block must assign `result` or save a figure to figure_path")
        value = ns.get("result")
        json.dumps(value)
        out[job["name"]] = {"value": value}
    except BaseException:
        out[job["name"]] = {"error": traceback.format_exc(limit=-3)}
json.dump(out, open(sys.argv[2], "w"))
"""


@dataclass
class Spec:
    """One result block."""
    name: str
    block: literate.Block
    frozen: bool
    inputs: list[str]
    output: bool = False          # :results output: the value is what the block prints

    @property
    def code(self) -> str:
        return "\n".join(self.block.body) + "\n"

    def hashes(self, root: Path) -> dict:
        """sha256 of the block's code and of each declared input (None if it is missing)."""
        def sha(data: bytes) -> str:
            return hashlib.sha256(data).hexdigest()
        inputs = {p: (sha((root / p).read_bytes()) if (root / p).is_file() else None)
                  for p in self.inputs}
        return {"code": sha(self.code.encode()), "inputs": inputs}


@dataclass
class Results:
    """Every result of a document: values, where they came from, and what is stale."""
    doc: literate.Document
    specs: dict[str, Spec]
    values: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.doc.path.resolve().parent

    def record_path(self, name: str) -> Path:
        return self.root / RESULTS_DIR / f"{name}.json"

    def figure_path(self, name: str) -> Path:
        return self.root / RESULTS_DIR / f"{name}.png"


def specs_of(doc: literate.Document) -> dict[str, Spec]:
    """The result blocks of a resolved document, by name."""
    out = {}
    for b in doc.blocks:
        kinds = b.params.get("results", "").split()
        if b.commented or ("value" not in kinds and "output" not in kinds):
            continue
        if b.lang != "python":
            raise TangleError(doc.path, b.line, f":results value on a {b.lang} block: "
                              "results are Python blocks")
        if not b.name:
            raise TangleError(doc.path, b.line, ":results value needs a #+name: the prose "
                              "cites the result by it")
        if b.params.get("tangle", "no") != "no":
            raise TangleError(doc.path, b.line, f"result {b.name} is tangled to "
                              f"{b.params['tangle']}: give it :tangle no")
        if any(literate.noweb_refs(line) for line in b.body) and b.params["noweb"] != "no":
            raise TangleError(doc.path, b.line, f"result {b.name}: noweb references are not "
                              "supported in results; import from the package instead")
        inputs = b.params.get("inputs", "").split()
        out[b.name] = Spec(b.name, b, b.params.get("cache", "no") == "yes", inputs,
                           "output" in kinds)
    return out


def run(res: Results, specs: list[Spec], figures: Path | None = None) -> dict[str, object]:
    """Run result blocks in one fresh interpreter, build/ on its path: name -> value.

    A block's figure goes to figures/NAME.png (default: beside the records)."""
    if not specs:
        return {}
    # The blocks import the package: it must be tangled from this very document.
    literate.write_outputs(res.doc.path, literate.tangle_document(res.doc))
    (res.root / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    jobs = [{"name": s.name, "code": s.code, "line": s.block.line, "file": str(res.doc.path),
             "figure": str(Path(figures) / f"{s.name}.png" if figures else res.figure_path(s.name)),
             "output": s.output} for s in specs]
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(res.root / "build"), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        proc = subprocess.run([sys.executable, "-c", RUNNER, f"{tmp}/jobs.json", f"{tmp}/out.json"],
                              cwd=res.root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TangleError(res.doc.path, None, f"the results could not run:\n{proc.stderr}")
        out = json.loads((Path(tmp) / "out.json").read_text())
    values = {}
    for s in specs:
        if "error" in out[s.name]:
            raise TangleError(res.doc.path, s.block.line,
                              f"result {s.name} failed:\n{out[s.name]['error'].rstrip()}")
        values[s.name] = out[s.name]["value"]
    return values


def load(doc: literate.Document) -> Results:
    """Cheap results computed now, frozen ones read from their records (warning if stale)."""
    specs = specs_of(doc)
    res = Results(doc, specs)
    res.values = run(res, [s for s in specs.values() if not s.frozen])
    for s in specs.values():
        if not s.frozen:
            continue
        path = res.record_path(s.name)
        if not path.is_file():
            res.warnings.append(f"{doc.path.name}:{s.block.line}: frozen result {s.name} is not "
                                f"recorded: run `make results` (or python results.py {s.name})")
            continue
        record = json.loads(path.read_text())
        res.values[s.name] = record["value"]
        why = staleness(res, s, record)
        if why:
            res.warnings.append(f"{doc.path.name}:{s.block.line}: result {s.name} is stale "
                                f"({why}): run `make results`")
    return res


def staleness(res: Results, s: Spec, record: dict) -> str | None:
    """Why a frozen result's record no longer matches its code and inputs, or None."""
    now = s.hashes(res.root)
    if record.get("code") != now["code"]:
        return "its code changed since it was recorded"
    old = record.get("inputs", {})
    # An input missing here (a run under the git-ignored runs/) cannot be checked: not stale.
    changed = [p for p in sorted(set(old) | set(now["inputs"]))
               if now["inputs"].get(p) is not None and old.get(p) != now["inputs"][p]]
    if changed:
        return "changed since it was recorded: " + ", ".join(changed)
    for f, digest in record.get("files", {}).items():
        p = res.root / RESULTS_DIR / f
        if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            return f"{RESULTS_DIR}/{f} differs from the recorded one"
    return None


def record(doc: literate.Document, names: list[str] | None = None) -> list[str]:
    """Recompute frozen results (all, or those named) and write their records."""
    specs = specs_of(doc)
    res = Results(doc, specs)
    unknown = [n for n in names or [] if n not in specs or not specs[n].frozen]
    if unknown:
        frozen = ", ".join(n for n, s in specs.items() if s.frozen) or "none"
        raise TangleError(doc.path, None, f"no frozen result named {', '.join(unknown)} "
                          f"(frozen results: {frozen})")
    todo = [s for s in specs.values() if s.frozen and (not names or s.name in names)]
    # New figures are drawn into a scratch folder and moved into place only when every block
    # has run: a failing block leaves the recorded figures and records as they were.
    (res.root / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".figures-", dir=res.root / RESULTS_DIR))
    try:
        values = run(res, todo, scratch)
        for s in todo:
            drawn, fig = scratch / f"{s.name}.png", res.figure_path(s.name)
            if drawn.is_file():
                os.replace(drawn, fig)
            else:                               # the block no longer draws a figure
                fig.unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    written = []
    for s in todo:
        files = {}
        fig = res.figure_path(s.name)
        if fig.is_file():
            files[fig.name] = hashlib.sha256(fig.read_bytes()).hexdigest()
        data = {"name": s.name, **s.hashes(res.root), "files": files, "value": values[s.name]}
        literate.atomic_write(res.record_path(s.name),
                            (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), 0o644)
        written.append(str(res.record_path(s.name).relative_to(res.root)))
    return written


# ---------------------------------------------------------------------------
# Citing a value in the prose
# ---------------------------------------------------------------------------

def lookup(res: Results, ref: str):
    """The value `NAME` or `NAME.KEY` names; KeyError with the reason if there is none."""
    name, _, key = ref.partition(".")
    if name not in res.specs:
        known = ", ".join(sorted(res.specs)) or "none"
        raise KeyError(f"no result named {name} (results: {known})")
    if name not in res.values:
        raise KeyError(f"result {name} has no value: run `make results`")
    value = res.values[name]
    if key:
        if not isinstance(value, dict) or key not in value:
            keys = ", ".join(map(str, value)) if isinstance(value, dict) else "none: it is not a dict"
            raise KeyError(f"result {name} has no key {key!r} (keys: {keys})")
        value = value[key]
    return value


def render(value, desc: str | None = None) -> str:
    """value as text, in the format of desc if desc is a number ("4.26M", "8.32", "13%")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        m = NUMBER.match(desc.strip()) if desc else None
        if m and (m.group(2) or m.group(3)):
            sign, whole, frac, suffix = m.groups()
            suffix = suffix or ""
            v = value / SCALE.get(suffix.strip(), 1)
            decimals = len(frac or "")
            text = f"{v:{',' if ',' in whole else ''}.{decimals}f}"
            if not whole and text.startswith(("0.", "-0.")):    # ".5" stays ".5"
                text = text.replace("0.", ".", 1)
            return text + suffix
        if isinstance(value, int):
            return f"{value:,}"
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def agrees(value, desc: str) -> bool:
    return " ".join(render(value, desc).split()) == " ".join(desc.split())


@dataclass
class Citation:
    line: int
    ref: str
    desc: str | None


def citations(doc: literate.Document) -> list[Citation]:
    """Every [[result:...]] link in the prose (not in blocks), with its line."""
    text = "\n".join(doc.lines)
    in_block = set()
    for b in doc.blocks:
        in_block.update(range(b.line, b.end_line + 1))
    inside = False
    for k, line in enumerate(doc.lines):        # example, export and comment blocks too
        if re.match(r"^[ \t]*#\+begin_(example|export|comment|src)\b", line, re.I):
            inside = True
        if inside:
            in_block.add(k + 1)
        if re.match(r"^[ \t]*#\+end_(example|export|comment|src)\b", line, re.I):
            inside = False
    out = []
    pos, line, counted = 0, 1, 0
    while m := LINK.search(text, pos):
        pos = m.start() + 1
        if m.start() > 0 and text[m.start() - 1] in "=~":
            continue
        line += text.count("\n", counted, m.start())     # counted once: linear in the file
        counted = m.start()
        if line not in in_block and not doc.lines[line - 1].lstrip().startswith("#"):
            out.append(Citation(line, m.group(1).strip(), m.group(2)))
        pos = m.end()
    return out


def check(res: Results) -> list[str]:
    """Every citation that names no value, or states a number the code does not compute."""
    problems = []
    for c in citations(res.doc):
        where = f"{res.doc.path.name}:{c.line}: [[result:{c.ref}]]"
        try:
            value = lookup(res, c.ref)
        except KeyError as e:
            problems.append(f"{where}: {e.args[0]}")
            continue
        if isinstance(value, (list, dict)):
            if c.desc is not None:
                problems.append(f"{where}: a table is placed by the link alone, without a description")
        elif c.desc is not None and not agrees(value, c.desc):
            problems.append(f"{where}: the prose says {' '.join(c.desc.split())!r}, "
                            f"the code computes {render(value, c.desc)!r} ({value!r})")
    return problems


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="results.py", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="record nothing; exit 1 if the prose and the results disagree")
    parser.add_argument("org", nargs="?", default="llm.org", type=Path)
    parser.add_argument("names", nargs="*", metavar="NAME", help="frozen results to recompute")
    args = parser.parse_args(argv)
    if args.org.suffix != ".org":       # `results.py NAME` with the default llm.org
        args.names.insert(0, str(args.org))
        args.org = Path("llm.org")
    try:
        doc = literate.parse(args.org)
        literate.resolve(doc)
        if args.check:
            res = load(doc)
            for w in res.warnings:
                print(f"warning: {w}", file=sys.stderr)
            problems = check(res)
            for p in problems:
                print(p)
            print(f"{len(res.specs)} results, {len(citations(doc))} citations, "
                  f"{len(problems)} problems", file=sys.stderr)
            return 1 if problems else 0
        for f in record(doc, args.names):
            print(f"wrote {f}")
        return 0
    except TangleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
