"""Make the tangled package importable and point failures in generated code back into llm.org."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))            # tangle.py, literate.py, weave.py, results.py
sys.path.insert(0, str(ROOT / "build"))  # the package tangled from llm.org

import tangle  # noqa: E402
import tested_by  # noqa: E402


def book_frames(tb, org: Path = ROOT / "llm.org") -> list[str]:
    """For each traceback frame in a tangled file: `file:line -> llm.org:LINE ⟨chunk⟩`."""
    files = tangle.load_manifest(org)["files"]
    root = org.resolve().parent
    out = []
    while tb is not None:
        path, lineno = Path(tb.tb_frame.f_code.co_filename), tb.tb_lineno
        try:
            rel = path.resolve().relative_to(root).as_posix()
        except ValueError:
            rel = None
        if rel in files and lineno <= len(files[rel]["map"]):
            org_line, chunk = files[rel]["map"][lineno - 1]
            out.append(f"{rel}:{lineno} -> {org.name}:{org_line} ⟨{chunk}⟩")
        tb = tb.tb_next
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None:
        frames = book_frames(call.excinfo.tb)
        if frames:
            report.sections.append(("where to fix it in llm.org", "\n".join(frames)))


# Under `make tested-by`, each test is named to coverage.py (tested_by.py says how).
pytest_runtest_protocol = tested_by.per_test_context()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine it only waits:
    a module asks for it with an autouse fixture, before its module-scoped models train."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llm_book():
    """weave.prepare(llm.org) once per session: the PDF, web and notebook tests share the
    slow part (pandoc reading the book, the cheap results running); each call gives a
    fresh copy of pandoc's AST, which the rewriters change."""
    import copy
    import weave
    book, ast, res = weave.prepare(ROOT / "llm.org")
    return lambda: (book, copy.deepcopy(ast), res)
