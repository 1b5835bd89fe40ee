"""A seeded fuzz of llm.org: each broken variant is refused or tangles into Python that compiles.

Every variant of the book (block lines deleted, duplicated or swapped, references misspelt,
cycles, bad targets, bytes that are not UTF-8, CR LF line ends, huge lines, stray header
characters) must end one of two ways:
  refused  exit 1, one line `error: llm.org:LINE: message`, and every file byte-identical
  built    exit 0, and every .py tangle wrote compiles
It runs on a copy of the book and of the tools in a temporary folder, never on build/.
"""
import contextlib
import io
import random
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

import tangle
from conftest import ROOT

STRUCTURE = re.compile(r"^[ \t]*(#\+(begin_src|end_src|name|header|property)|:(PROPERTIES|END|"
                       r"header-args\S*):|\*+ )", re.I)
BAD_TARGETS = [".", "/tmp/fuzz.py", "../fuzz.py", "~/fuzz.py", "tests", "build", "build/llm",
               "build/llm/model.py/x.py", ".git/hooks/pre-commit", "LLM.org", "llm.org",
               "tangle.py", "Literate.py", "Makefile", "build/llm/Model.py", "build/",
               ".llm.tangle.json", "build/llm/new.py", "a\0b.py", "x" * 300 + ".py"]
NOISE = [":", " :", "*", "#+", ",", "\t", "<<", ">>", '"', "(", ")", "\0", "\x0c", "\u00e9"]


def mutate(text: str, rng: random.Random, huge: int) -> tuple[bytes, list[str]]:
    """One variant of the book: one to three mutations, described for the report."""
    lines = text.split("\n")
    done, at_end = [], []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choice(["delete", "duplicate", "swap", "ref", "cycle", "target", "noise",
                           "colon", "huge", "crlf", "bytes"])
        structural = [k for k, s in enumerate(lines) if STRUCTURE.match(s)]
        k = rng.choice(structural) if structural and rng.random() < 0.8 else \
            rng.randrange(len(lines))
        if kind == "delete":
            del lines[k]
        elif kind == "duplicate":
            lines.insert(k, lines[k])
        elif kind == "swap":
            j = min(max(k + rng.randint(-6, 6), 0), len(lines) - 1)
            lines[k], lines[j] = lines[j], lines[k]
        elif kind == "ref":
            users = [i for i, s in enumerate(lines) if "<<" in s and ">>" in s]
            if users:
                k = rng.choice(users)
                lines[k] = re.sub(r"<<([^<>]+)>>", lambda m: f"<<{m.group(1)}-typo>>", lines[k], 1)
            else:
                lines.insert(k, "<<no-such-chunk>>")
        elif kind == "cycle":
            names = [i for i, s in enumerate(lines[:-2]) if s.lower().startswith("#+name: ")
                     and lines[i + 1].lower().startswith("#+begin_src python")]
            if names:
                k = rng.choice(names)
                lines.insert(k + 2, f"<<{lines[k].split(None, 1)[1].strip()}>>")
        elif kind == "target":
            hits = [i for i, s in enumerate(lines) if ":tangle build/" in s]
            k = rng.choice(hits)
            lines[k] = re.sub(r":tangle build/\S+", f":tangle {rng.choice(BAD_TARGETS)}",
                              lines[k], 1)
        elif kind == "noise":
            pos = rng.randint(0, len(lines[k]))
            lines[k] = lines[k][:pos] + rng.choice(NOISE) + lines[k][pos:]
        elif kind == "colon":
            begins = [i for i, s in enumerate(lines) if s.lower().startswith("#+begin_src")]
            k = rng.choice(begins)
            lines[k] += " :"
        elif kind == "huge":
            pieces = ["<<", ">>", " ", "a", "<<a", "b>>", "\t", "#", "x = 1", "'", "[[result:"]
            line = "".join(rng.choice(pieces) for _ in range(huge // 4))
            lines.insert(k + rng.randint(0, 1), line)
        elif kind == "crlf":
            if rng.random() < 0.5:
                lines = [s + "\r" for s in lines]
            else:
                lines[k] += "\r"
        elif kind == "bytes":
            at_end.append(k)
        done.append(f"{kind}@{k + 1}")
    data = "\n".join(lines).encode("utf-8")
    for k in at_end:                    # not UTF-8: a lone continuation byte, a bad lead byte
        starts = [0] + [m.end() for m in re.finditer(b"\n", data)]
        pos = starts[min(k, len(starts) - 1)]
        data = data[:pos] + rng.choice([b"\xff", b"\x80", b"\xc3(", b"\xed\xa0\x80"]) + data[pos:]
    return data, done


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mode & 0o777)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "llm.org"}


def run(org: Path, *args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = tangle.main([*args, str(org)])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    """A copy of the tools and of llm.org, tangled once: the state every variant starts from."""
    root = tmp_path_factory.mktemp("fuzz")
    for name in ["literate.py", "tangle.py", "weave.py", "results.py", "Makefile", "llm.org"]:
        shutil.copy(ROOT / name, root / name)
    (root / "tests").mkdir()
    (root / ".git" / "hooks").mkdir(parents=True)
    org = root / "llm.org"
    assert run(org) == (0, "")
    return org, snapshot(root)


def fuzz(book, seeds, huge: int) -> Counter:
    org, good = book
    root, original = org.parent, org.read_bytes()
    text = original.decode()
    counts, failures = Counter(), []
    for seed in seeds:
        data, what = mutate(text, random.Random(seed), huge)
        org.write_bytes(data)
        try:
            rc, err = run(org)
        except Exception as e:          # a traceback: the worst outcome
            rc, err = -1, f"{type(e).__name__}: {e}"
        m = re.fullmatch(r"error: llm\.org:(\d+): [^\n]+\n", err)
        if rc == 1 and m and 1 <= int(m.group(1)) <= data.count(b"\n") + 1:
            if snapshot(root) == good:
                counts["refused"] += 1
                counts[f"refused: {kind_of(err)}"] += 1
                continue
            failures.append((seed, what, "refused, but files changed", err))
        elif rc == 0:
            broken = []
            for f in sorted(root.glob("build/**/*.py")):
                try:
                    compile(f.read_bytes(), str(f), "exec", dont_inherit=True)
                except (SyntaxError, ValueError) as e:
                    broken.append(f"{f.name}: {e}")
            now = snapshot(root)
            changed = {f for f in set(now) | set(good) if now.get(f) != good.get(f)}
            counts["built"] += 1
            counts["built: same build/" if not changed else "built: changed build/"] += 1
            if broken:
                failures.append((seed, what, "built, but does not compile", broken[:2]))
            # Only build/ and the manifest change; the Makefile when a block names it itself.
            explicit = b":tangle Makefile" in data and "target" in " ".join(what)
            outside = {f for f in changed if not f.startswith("build/")} - \
                {".llm.tangle.json"} - ({"Makefile"} if explicit else set())
            if outside:
                failures.append((seed, what, "built, and wrote outside build/", sorted(outside)))
            for f in changed - {".llm.tangle.json"}:
                if not f.startswith("build/") and f in good:
                    (root / f).write_bytes(good[f][0])   # what tangle leaves for the user
            org.write_bytes(original)   # back to the good book, by tangle itself
            assert run(org) == (0, "") and snapshot(root) == good, (seed, what)
        else:
            failures.append((seed, what, f"exit {rc}", err[-300:]))
    org.write_bytes(original)
    counts["failed"] = len(failures)
    print(f"\nfuzz of llm.org, {len(seeds)} variants:", dict(sorted(counts.items())))
    assert not failures, failures[:5]
    return counts


def kind_of(err: str) -> str:
    """The kind of refusal, for the report: the message without names and numbers."""
    msg = err.split(": ", 2)[-1]
    for key in ["would not compile", "unknown noweb reference", "cycle", "without #+end_src",
                "without a #+begin_src", "inside the block of line", "not valid UTF-8", "CR LF",
                ":tangle", "header argument", "starting with '*'", "duplicate #+name",
                "property", "language", "is also the #+name", "Emacs Lisp", "needs a value"]:
        if key in msg:
            return key
    return msg[:40]


def test_fuzz_llm_org(book):
    """60 variants (a few seconds): each refused with build/ untouched, or built and compiling."""
    counts = fuzz(book, range(60), huge=200_000)
    assert counts["refused"] + counts["built"] == 60


@pytest.mark.slow
def test_fuzz_llm_org_many(book):
    counts = fuzz(book, range(1000, 1500), huge=2_000_000)
    assert counts["refused"] + counts["built"] == 500
