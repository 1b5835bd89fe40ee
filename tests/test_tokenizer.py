"""The tokenizers of Part I: hand-worked merges, round trips, parity with tiktoken, files."""
import base64
import json
import random
import re

import pytest
import regex
import tiktoken
import tiktoken.load
from tiktoken_ext import openai_public

from conftest import ROOT
from llm import tokenizer as tk
from llm.tokenizer import EOT, GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, CharTokenizer

BOOK = (ROOT / "llm.org").read_text(encoding="utf-8")

# Phrases in many scripts, with the things that trip tokenizers up: combining marks, emoji
# sequences joined by U+200D, digits of other scripts, contractions, odd whitespace.
PHRASES = [
    "Hello, world!", "Don't panic; it's fine. We'll see, they've said, I'd go, you're right.",
    "WHO'S THERE? I'M HERE.", "Ça va? Noël à l'école, naïve café", "cafe\u0301 ne\u0303",
    "Привет, мир! Как дела?", "Γειά σου Κόσμε", "مرحبا بالعالم ١٢٣٤", "שלום עולם",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "你好，世界！今天天气很好。", "こんにちは世界、カタカナ",
    "안녕하세요 세계", "😀😃 👍🏽 👩‍👩‍👧 🇫🇷", "x = 12345678 + 3.14159; y=-7", "\t\tindented\r\n",
    "a  b   c    d", "\n\n\n", "   ", "end.\n\n  \n", "(parenthesis)[brackets]{braces}", "§¶†‡•…",
    "\u00a0nbsp\u2028line\u2029para", "ZWJ\u200dand\u200cZWNJ", "’curly’ “quotes”",
]


def multilingual(n: int, seed: int = 0) -> str:
    """n phrases drawn at random, joined by random whitespace."""
    r = random.Random(seed)
    return "".join(r.choice(PHRASES) + r.choice([" ", "\n", "  ", "\n\n", "\t", ""]) for _ in range(n))


@pytest.fixture(scope="module")
def book_bpe() -> BPETokenizer:
    """A 1000-token vocabulary trained on the book and some multilingual text."""
    return BPETokenizer.train(BOOK + multilingual(500, seed=1), 1000)


# --- training --------------------------------------------------------------------------------

def test_hand_worked_merges():
    """The merges table of the chapter, ties included, from both trainers."""
    text = "the cat sat on the mat; the rat sat on the cat"
    expected = [(b"a", b"t"), (b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"s", b"at"), (b"o", b"n")]
    for trainer in ("naive", "incremental", "fast"):
        tok = BPETokenizer.train(text, 256 + 6 + 1, trainer=trainer)
        assert [(tok.vocab[a], tok.vocab[b]) for a, b in tok.merges] == expected
        ids = tok.encode(text)
        assert len(text.encode()) == 46 and len(ids) == 25
        assert [tok.vocab[i] for i in ids[:4]] == [b"the", b" ", b"c", b"at"]
        assert tok.eot_id == 256 + 6 and tok.vocab_size == 263


def test_pretoken_counts_cut_specials_out():
    counts = tk.pretoken_counts(f"the end{EOT}the end", GPT2_PATTERN, [EOT])
    assert counts == {"the": 2, " end": 2}
    assert "endoftext" in tk.pretoken_counts(f"the end{EOT}", GPT2_PATTERN)  # the pitfall


@pytest.mark.parametrize("seed", range(12))
def test_naive_and_incremental_trainers_agree(seed):
    r = random.Random(seed)
    alphabet = r.choice(["ab", "abc ", "aé😀 ", "xyz\n ", "the cat "])
    text = "".join(r.choice(alphabet) for _ in range(r.randint(50, 800)))
    if seed % 3 == 0:
        text += BOOK[:3000 * seed]
    words = {tuple(p.encode()): n for p, n in tk.pretoken_counts(text, GPT2_PATTERN).items()}
    n = r.randint(20, 150)
    naive = tk.merges_naive(words, n)
    assert naive == tk.merges_incremental(words, n) == tk.merges_fast(words, n)


def test_three_trainers_agree_on_the_book():
    """Hundreds of merges on real text, where ties and overlapping pairs (like 'ee') occur."""
    words = {tuple(p.encode()): n for p, n in tk.pretoken_counts(BOOK[:40000] + multilingual(
        100, seed=9), GPT2_PATTERN).items()}
    fast = tk.merges_fast(words, 400)
    assert len(fast) == 400 and fast == tk.merges_incremental(words, 400)
    assert fast[:60] == tk.merges_naive(words, 60)


def test_parallel_pretoken_counts_equal_serial():
    docs = [BOOK[k * 3000:(k + 1) * 3000] + multilingual(20, seed=k) for k in range(7)]
    text = EOT.join(docs) + "<|x|>" + multilingual(30, seed=11)
    for specials in ([EOT, "<|x|>"], []):
        serial = tk.pretoken_counts(text, GPT2_PATTERN, specials)
        for processes in (1, 2, 3):
            assert tk.pretoken_counts_parallel(text, GPT2_PATTERN, specials, processes) == serial


def test_ascii_twin_classes_hold_the_same_ascii_characters():
    ascii_chars = [chr(c) for c in range(128)]
    for ours, twin in [(r"\s", r"\s"), (r"\p{L}", "[A-Za-z]"), (r"\p{N}", "[0-9]"),
                       (r"[^\s\p{L}\p{N}]", r"[^\sA-Za-z0-9]")]:
        assert ([c for c in ascii_chars if regex.fullmatch(ours, c)]
                == [c for c in ascii_chars if re.fullmatch(twin, c, re.ASCII)]), ours


def test_ascii_twin_splits_like_the_pattern():
    r = random.Random(0)
    pieces = [chr(c) for c in range(128)] + ["'s", "'ll", "'D", "  ", "\n\n", " 12", "ab"]
    texts = ["".join(r.choices(pieces, k=r.randint(0, 80))) for _ in range(3000)]
    texts.append("".join(c for c in BOOK if c.isascii()))
    twin = re.compile(tk.ASCII_TWINS[GPT2_PATTERN], re.ASCII)
    split = tk.pretoken_splitter(GPT2_PATTERN)
    for text in texts:
        expected = regex.findall(GPT2_PATTERN, text)
        assert twin.findall(text) == expected and split(text) == expected
    for text in PHRASES:    # text that is not ASCII takes the pattern itself
        assert split(text) == regex.findall(GPT2_PATTERN, text)
    assert tk.pretoken_splitter(GPT4_PATTERN)("Don't 12345") == regex.findall(GPT4_PATTERN,
                                                                              "Don't 12345")


def test_fast_trainer_when_nothing_pairs():
    assert tk.merges_fast({(97,): 3, (98,): 1}, 5) == []
    assert tk.count_pairs(["ab", "b", "abab"], [2, 5, 1])[0] == {"ab": 4, "ba": 1}


def test_unknown_trainer():
    with pytest.raises(ValueError, match="unknown trainer 'quick'"):
        BPETokenizer.train("hello", 300, trainer="quick")


def test_training_stops_when_no_pairs_are_left():
    tok = BPETokenizer.train("aaaa", 1000)
    assert [tok.vocab[256], tok.vocab[257]] == [b"aa", b"aaaa"] and len(tok.merges) == 2
    assert tok.special_tokens == {EOT: 258}


def test_vocab_size_below_bytes_and_specials():
    with pytest.raises(ValueError, match=r"vocab_size 256 is too small.*= 257"):
        BPETokenizer.train("hello", 256)


def test_descending_key_reverses_byte_order():
    words = [b"", b"a", b"ab", b"b", b"\x00", b"\x00\x00", b"\xff", b"a\x00"]
    assert sorted(words, key=tk.descending) == sorted(words, reverse=True)


# --- encoding and decoding -------------------------------------------------------------------

ROUND_TRIP = ["", "héllo wörld", "e\u0301 vs \u00e9", "😀 👍🏽 👩‍👩‍👧", "漢字かな交じり文",
              "  spaces   and\ttabs\n\n\n", "\r\n\r\n", " leading", "trailing ", "mixed: Ωμέγα 123 ١٢٣"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(book_bpe, text):
    assert book_bpe.decode(book_bpe.encode(text)) == text
    char = CharTokenizer.train("".join(ROUND_TRIP))
    assert char.decode(char.encode(text)) == text


def test_round_trip_special_tokens(book_bpe):
    text = f"one{EOT}two {EOT}{EOT}\nthree"
    ids = book_bpe.encode(text, allowed_special="all")
    assert ids.count(book_bpe.eot_id) == 3
    assert book_bpe.decode(ids) == text
    char = CharTokenizer.train(text)
    assert char.decode(char.encode(text, allowed_special="all")) == text
    assert len(char.chars) == len(set("onetwohr \n")) and char.eot_id == len(char.chars)


def test_decode_replaces_broken_utf8_and_refuses_unknown_ids(book_bpe):
    ids = book_bpe.encode("😀")
    assert book_bpe.decode(ids) == "😀"
    assert book_bpe.decode(book_bpe.encode("a😀")[:-1]).startswith("a\ufffd")
    with pytest.raises(ValueError, match="token id 5000 is not in the vocabulary"):
        book_bpe.decode([5000])
    import numpy as np
    assert book_bpe.decode(np.array(book_bpe.encode("tensor-like"))) == "tensor-like"


def test_char_tokenizer_unknown_character_is_an_error():
    tok = CharTokenizer.train("To be, or not to be")
    assert tok.decode(tok.encode("be or not")) == "be or not"
    with pytest.raises(ValueError, match=r"character 'ë' \(U\+00EB\) at position 2"):
        tok.encode("noë")


SHAKESPEARE_CHARS = "\n !\"&'()*,-./0123456789:;?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz{}"


def test_book_example_of_the_character_tokenizer():
    """The ids and the error the book shows for the 84 characters of the Shakespeare corpus."""
    tok = CharTokenizer(SHAKESPEARE_CHARS)
    assert len(tok.chars) == 84 and tok.eot_id == 84 and tok.vocab_size == 85
    assert tok.encode("To be, or not") == [46, 70, 1, 57, 60, 9, 1, 70, 73, 1, 69, 70, 75]
    with pytest.raises(ValueError, match=r"character 'ë' \(U\+00EB\) at position 2 is not among the 84"):
        tok.encode("Noël")


# --- special tokens ---------------------------------------------------------------------------

def test_special_tokens_allowed_disallowed_and_ordinary(book_bpe):
    text = f"a{EOT}b"
    with pytest.raises(ValueError, match="contains the special token '<\\|endoftext\\|>'"):
        book_bpe.encode(text)
    as_special = book_bpe.encode(text, allowed_special={EOT})
    as_text = book_bpe.encode(text, disallowed_special=())
    assert as_special == book_bpe.encode("a") + [book_bpe.eot_id] + book_bpe.encode("b")
    assert book_bpe.eot_id not in as_text and book_bpe.decode(as_text) == text
    assert as_text == book_bpe.encode_ordinary(text)
    with pytest.raises(ValueError, match="not special tokens of this tokenizer"):
        book_bpe.encode("x", allowed_special={"<|nope|>"})


def test_longest_overlapping_special_token_wins():
    tok = BPETokenizer.train("abc abd", 300, special_tokens=["<|a|>", "<|a|>b", "b<|"])
    a, ab = tok.special_tokens["<|a|>"], tok.special_tokens["<|a|>b"]
    assert tok.encode("<|a|>b<|a|>", allowed_special="all") == [ab, a]
    assert tok.encode("x<|a|>", allowed_special={"<|a|>"}) == tok.encode("x") + [a]
    assert tok.encode("<|a|>b", allowed_special={"<|a|>"}, disallowed_special=()) == [a] + tok.encode("b")


# --- parity with tiktoken ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_text() -> str:
    return BOOK + multilingual(6000, seed=2)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_encoder_matches_tiktoken(big_text, pattern):
    tok = BPETokenizer.train(BOOK[:60000] + multilingual(300, seed=3), 1500, tk.PATTERNS[pattern])
    enc = tok.to_tiktoken()
    assert tok.encode_ordinary(big_text) == enc.encode_ordinary(big_text)
    assert tok.encode(big_text, allowed_special="all") == enc.encode(big_text, allowed_special="all")
    tok.fast = True  # the switch: same ids, now computed by tiktoken
    assert tok.encode(big_text, allowed_special="all") == enc.encode(big_text, allowed_special="all")


def test_lone_surrogates_encode_as_tiktoken_encodes_them():
    """tiktoken reads a lone surrogate as U+FFFD and joins a split pair; ours must too."""
    tok = BPETokenizer.train(BOOK[:20000] + "a\ufffdb \U0001F600" * 3, 400)
    enc = tok.to_tiktoken()
    for text in ["a\ud800b", "\udfff", "x \ud83d\ude00 y", "\ud800" * 3 + " c"]:
        assert tok.encode_ordinary(text) == enc.encode_ordinary(text), repr(text)
        assert tok.encode(text) == enc.encode(text)
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_pre_tokenizers_match_tiktoken_patterns(big_text, monkeypatch, book_bpe):
    """Our patterns cut text exactly as tiktoken's published ones (GPT-2 and cl100k)."""
    assert regex.findall(GPT2_PATTERN, big_text) == regex.findall(openai_public.r50k_pat_str, big_text)
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: {})  # no download
    cl100k = openai_public.cl100k_base()["pat_str"]
    assert regex.findall(GPT4_PATTERN, big_text) == regex.findall(cl100k, big_text)
    enc = tiktoken.Encoding("theirs", pat_str=openai_public.r50k_pat_str,
                            mergeable_ranks=book_bpe.ranks, special_tokens=book_bpe.special_tokens)
    assert book_bpe.encode_ordinary(big_text) == enc.encode_ordinary(big_text)


# --- streaming --------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_encode_iterable_equals_encode_at_any_cut(pattern):
    r = random.Random(4)
    tok = BPETokenizer.train(BOOK[:40000] + multilingual(200, seed=5), 700, tk.PATTERNS[pattern],
                             special_tokens=[EOT, "<|fim|>"])
    pieces = ["a", " ", "  ", "\n", "\n\n", "\r\n", "'", "l", "'ll", "'S", "12345", "é", "😀",
              "!!", "(", EOT, "<|fim|>", "<|endof", "text|>", "Don't", " \n ", "\u0301"]
    texts = [BOOK[:20000], multilingual(300, seed=6)] + \
            ["".join(r.choice(pieces) for _ in range(r.randint(1, 15))) for _ in range(300)]
    for text in texts:
        for allowed in (set(), "all"):
            full = tok.encode(text, allowed_special=allowed, disallowed_special=())
            for _ in range(3):
                cuts = sorted(r.sample(range(len(text) + 1), min(len(text), r.randint(1, 60))))
                chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
                got = list(tok.encode_iterable(chunks, allowed_special=allowed, disallowed_special=()))
                assert got == full, (text, chunks)
    lines = BOOK.splitlines(keepends=True)
    assert list(tok.encode_iterable(lines, disallowed_special=())) == tok.encode_ordinary(BOOK)


def test_encode_iterable_streams_a_file_and_refuses_disallowed(tmp_path, book_bpe):
    path = tmp_path / "book.txt"
    path.write_text(BOOK.replace(EOT, "eot"), encoding="utf-8")
    with open(path, encoding="utf-8", newline="") as f:
        assert list(book_bpe.encode_iterable(f)) == book_bpe.encode(path.read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="special token"):
        list(book_bpe.encode_iterable(["abc <|endof", "text|> def"]))


# --- files ------------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path, book_bpe):
    book_bpe.save(tmp_path / "tokenizer.json")
    loaded = tk.load_tokenizer(tmp_path)  # the folder that holds tokenizer.json
    assert isinstance(loaded, BPETokenizer) and loaded.ranks == book_bpe.ranks
    assert loaded.pattern == book_bpe.pattern and loaded.special_tokens == book_bpe.special_tokens
    text = BOOK[:30000]
    assert loaded.encode(text, allowed_special="all") == book_bpe.encode(text, allowed_special="all")
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["kind"] == "bpe" and saved["tokens"][256 + 0] == book_bpe.vocab[256].decode("latin-1")

    char = CharTokenizer.train("hello world\n")
    char.save(tmp_path / "char.json")
    again = tk.load_tokenizer(tmp_path / "char.json")
    assert isinstance(again, CharTokenizer) and again.vocab == char.vocab and again.eot_id == char.eot_id

    (tmp_path / "bad.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        tk.load_tokenizer(tmp_path / "bad.json")


def test_load_gpt2_files_written_from_our_tokenizer(tmp_path, book_bpe):
    to_str = tk.gpt2_bytes_to_unicode()
    spell = lambda token: "".join(to_str[b] for b in token)  # noqa: E731
    assert spell(b" the") == "Ġthe" and len(set(to_str.values())) == 256
    encoder = {spell(t): i for t, i in book_bpe.ranks.items()} | book_bpe.special_tokens
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    merges = "".join(f"{spell(book_bpe.vocab[a])} {spell(book_bpe.vocab[b])}\n" for a, b in book_bpe.merges)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    gpt2 = tk.load_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert gpt2.ranks == book_bpe.ranks and gpt2.special_tokens == book_bpe.special_tokens
    assert gpt2.encode(BOOK, allowed_special="all") == book_bpe.encode(BOOK, allowed_special="all")
    del encoder[spell(book_bpe.vocab[300])]
    (tmp_path / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    with pytest.raises(ValueError, match="lacks 1 tokens"):
        tk.load_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


def test_load_tiktoken_file_written_from_our_tokenizer(tmp_path, book_bpe):
    path = tmp_path / "ours.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for t, i in book_bpe.ranks.items()))
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == book_bpe.ranks  # tiktoken reads our file
    loaded = tk.load_tiktoken(path, GPT2_PATTERN, book_bpe.special_tokens)
    assert loaded.encode(BOOK, allowed_special="all") == book_bpe.encode(BOOK, allowed_special="all")


def test_bpe_needs_every_byte():
    ranks = {bytes([b]): b for b in range(255)}
    with pytest.raises(ValueError, match="lacks 1 of the 256 bytes"):
        BPETokenizer(ranks)


def test_encoding_by_rank_replays_the_merges_in_training_order():
    """What the chapter claims: merging lowest ranks first = applying the merges in order."""
    tok = BPETokenizer.train(BOOK[:50000], 420)
    for piece in tk.pretoken_counts(BOOK[:50000] + multilingual(100, seed=7), GPT2_PATTERN):
        word = tuple(piece.encode("utf-8"))
        for new_id, pair in enumerate(tok.merges, start=256):
            word = tk.merge_pair(word, pair, new_id)
        assert tok.encode_ordinary(piece) == list(word), piece
