"""Generation: samplers and penalties on hand-made logits, seeds, stop strings, the KV cache, the CLI."""
import math
import re

import pytest
import torch

from llm import generate as g



@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (conftest's one_thread)."""


# --- samplers on hand-made logits -------------------------------------------------------

def test_greedy_is_argmax_per_row():
    z = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.5]])
    assert g.greedy(z).tolist() == [1, 0]


def test_top_k_keeps_exactly_k_even_with_ties():
    z = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5, 2.0])
    out = g.top_k(z, 2)
    assert torch.isfinite(out).sum() == 2
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], z[kept]) and (z[kept] == 3.0).all()
    out = g.top_k(z, 4)                         # the three 3.0s and the 2.0
    assert torch.isfinite(out).tolist() == [False, True, True, True, False, True]
    assert torch.equal(g.top_k(z, 6), z) and torch.equal(g.top_k(z, 100), z)
    batch = g.top_k(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), 1)
    assert torch.isfinite(batch).tolist() == [[False, False, True], [True, False, False]]


@pytest.mark.parametrize("p, kept", [(0.5, 1), (0.50001, 2), (0.8, 2), (0.80001, 3),
                                     (0.9, 3), (0.95, 3), (0.96, 4), (1.0, 4), (1e-9, 1)])
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])           # sorted: 0.5, 0.3, 0.15, 0.05
    z = probs.log() + 1.7                                    # any shift: softmax is the same
    out = g.top_p(z, p)
    assert int(torch.isfinite(out).sum()) == kept
    by_rank = [1, 3, 0, 2]
    assert torch.isfinite(out)[by_rank].tolist() == [True] * kept + [False] * (4 - kept)
    assert torch.equal(out[torch.isfinite(out)], z[torch.isfinite(out)])   # untouched
    # the kept set is the smallest whose mass reaches p
    mass = probs[torch.isfinite(out)].sum()
    assert mass >= p - 1e-6
    assert kept == 1 or mass - probs[torch.isfinite(out)].min() < p


def test_top_p_batched_rows_are_independent():
    z = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])   # peaked vs flat
    out = g.top_p(z, 0.9)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 3]


def test_temperature_limits():
    z = torch.tensor([2.0, 1.0, 0.0])
    for tau, expected in [(1.0, [0.6652, 0.2447, 0.0900]), (0.5, [0.8668, 0.1173, 0.0159]),
                          (2.0, [0.5065, 0.3072, 0.1863])]:
        assert torch.allclose(torch.softmax(g.temperature(z, tau), -1), torch.tensor(expected),
                              atol=1e-4)
    # tau -> 0: one-hot on the argmax; tau -> inf: uniform
    assert torch.allclose(torch.softmax(g.temperature(z, 1e-3), -1), torch.tensor([1.0, 0, 0]))
    assert torch.allclose(torch.softmax(g.temperature(z, 1e6), -1), torch.full((3,), 1 / 3))
    # and the sampler agrees: a tiny temperature always draws the argmax, 0 is greedy
    none, counts = torch.zeros(3, dtype=torch.bool), torch.zeros(3)
    gen = g.random_stream(0)
    draws = {g.choose(z, g.Sampling(temperature=1e-3), none, counts, gen) for _ in range(200)}
    assert draws == {0}
    assert g.choose(z, g.Sampling(temperature=0), none, counts) == 0


def test_repetition_penalty_changes_exactly_the_present_tokens():
    z = torch.tensor([2.4, -1.0, 0.0, 3.0, -2.0])
    present = torch.tensor([True, True, True, False, False])
    out = g.repetition_penalty(z, present, 1.2)
    assert torch.allclose(out, torch.tensor([2.0, -1.2, 0.0, 3.0, -2.0]))
    assert torch.equal(g.repetition_penalty(z, present, 1.0), z)


def test_frequency_and_presence_penalties():
    z = torch.tensor([1.0, 1.0, 1.0, 1.0])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = g.frequency_presence_penalty(z, counts, frequency=0.5, presence=0.25)
    assert torch.allclose(out, torch.tensor([1.0, 1 - 0.5 - 0.25, 1 - 1.5 - 0.25, 1.0]))
    # additive in logits = multiplicative in odds: exp(-0.5 * 3) for the frequency part
    p = torch.softmax(g.frequency_presence_penalty(z, counts, 0.5, 0.0), -1)
    assert math.isclose(p[2] / p[0], math.exp(-1.5), rel_tol=1e-5)


def test_choose_applies_penalties_before_greedy():
    z = torch.tensor([3.0, 2.9, 0.0])
    present = torch.tensor([True, False, False])
    counts = torch.tensor([1.0, 0.0, 0.0])
    none, zero = torch.zeros(3, dtype=torch.bool), torch.zeros(3)
    greedy = g.Sampling(temperature=0)
    assert g.choose(z, greedy, none, zero) == 0
    assert g.choose(z, g.Sampling(temperature=0, repetition_penalty=1.1), present, zero) == 1
    assert g.choose(z, g.Sampling(temperature=0, presence_penalty=0.2), none, counts) == 1
    assert g.choose(z, g.Sampling(temperature=0, frequency_penalty=0.2), none, counts) == 1


def test_choose_only_draws_kept_tokens_with_the_right_frequencies():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    none, zero = torch.zeros(4, dtype=torch.bool), torch.zeros(4)
    gen = g.random_stream(1)
    n = 4000
    draws = torch.tensor([g.choose(probs.log(), g.Sampling(top_p=0.8), none, zero, gen)
                          for _ in range(n)])
    freq = torch.bincount(draws, minlength=4) / n
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.625) < 0.03            # 0.5 / (0.5 + 0.3)
    draws = {g.choose(probs.log(), g.Sampling(top_k=3), none, zero, gen) for _ in range(500)}
    assert draws == {0, 1, 2}


def test_seeded_sampling_is_reproducible_and_private():
    z = torch.randn(50, generator=torch.Generator().manual_seed(0))
    none, zero = torch.zeros(50, dtype=torch.bool), torch.zeros(50)
    s = g.Sampling(temperature=1.5, seed=123)

    def run():
        gen = g.random_stream(s.seed)
        return [g.choose(z, s, none, zero, gen) for _ in range(100)]

    torch.manual_seed(0)
    global_before = torch.rand(3)
    torch.manual_seed(0)
    first = run()
    assert torch.equal(torch.rand(3), global_before)     # the global stream was not touched
    assert run() == first
    other = g.random_stream(124)
    assert [g.choose(z, s, none, zero, other) for _ in range(100)] != first


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top-p must be in (0, 1]"), (dict(top_p=1.5), "top-p must be in (0, 1]"),
    (dict(temperature=-0.1), "temperature must be >= 0"), (dict(top_k=0), "top-k must be >= 1"),
    (dict(repetition_penalty=0.0), "repetition penalty must be > 0"),
    (dict(max_new_tokens=-1), "max new tokens must be >= 0"),
    (dict(stop_strings=("",)), "stop string must not be empty")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        g.Sampling(**kwargs)


# --- stop strings and streaming text ------------------------------------------------------

class ChunkTokenizer:
    """A byte-level tokenizer whose tokens are given byte strings: enough to split characters."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def stream(chunks: list[bytes], stops=()) -> tuple[list[str], g.TextStream]:
    tok = ChunkTokenizer(chunks)
    s = g.TextStream(tok, stops)
    out = []
    for i in range(len(chunks)):
        out.append(s.push(i))
        if s.stopped:
            return out, s
    out.append(s.finish())
    return out, s


def test_stream_never_splits_a_character():
    text = "né 😀 €!"
    data = text.encode()
    pieces, s = stream([data[i:i + 1] for i in range(len(data))])        # one byte per token
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["n", "", "é"]           # C3 held back until A9 arrives
    # tokens that end inside one character and start the next one
    chunks = [b"n\xc3", b"\xa9 \xf0\x9f", b"\x98", b"\x80 \xe2\x82", b"\xac!"]
    pieces, _ = stream(chunks)
    assert pieces == ["n", "é ", "", "😀 ", "€!", ""]
    assert len(s.pending) == 0


def test_stream_shows_invalid_bytes_one_step_late():
    pieces, _ = stream([b"a", b"\xff", b"b", b"\xc3"])
    assert pieces == ["a", "", "\ufffdb", "", "\ufffd"]   # the last one only at finish()


def test_stop_string_across_token_boundaries():
    pieces, s = stream([b"Hello\n", b"\nWor", b"ld"], stops=("\n\n",))
    assert pieces == ["Hello", ""] and s.stopped      # "\n" held back, then the stop found
    pieces, s = stream([b"Hello\n", b"there", b"\n"], stops=("\n\n",))
    assert pieces == ["Hello", "\nthere", "", "\n"] and not s.stopped


def test_earliest_stop_string_wins_and_nothing_after_it_is_shown():
    pieces, s = stream([b"To be, or ", b"not to be: ROMEO: and JULIET:"],
                       stops=("JULIET:", "ROMEO:"))
    assert "".join(pieces) == "To be, or not to be: " and s.stopped
    pieces, s = stream([b"abcab", b"cabd"], stops=("abcabd",))   # overlapping self-prefixes
    assert "".join(pieces) == "abc" and s.stopped


def test_partial_stop():
    assert g.partial_stop("the end\n", ("\n\n",)) == 1
    assert g.partial_stop("KING RICH", ("RICHARD:", "KING")) == 4
    assert g.partial_stop("anything", ()) == 0
    assert g.partial_stop("stop", ("stop",)) == 0            # whole matches are found, not held


# --- the loop and the context window ------------------------------------------------------

class Recorder(torch.nn.Module):
    """A stand-in model that records what it reads and prefers token (last + 1) % V."""

    def __init__(self, vocab_size=16, block_size=8):
        super().__init__()
        self.config = type("Config", (), dict(vocab_size=vocab_size, block_size=block_size))()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, idx, targets=None):
        self.calls.append(idx[0].tolist())
        logits = torch.full((*idx.shape, self.config.vocab_size), -5.0)
        logits[0, -1, (idx[0, -1] + 1) % self.config.vocab_size] = 5.0
        return logits, None


def test_window_rule_without_cache():
    model = Recorder(block_size=8)
    d = g.Decoder(model, use_cache=False)                     # keep = 4
    d.feed(list(range(10)))                                    # a prompt longer than block_size
    assert model.calls[-1] == list(range(2, 10))               # its last 8 tokens
    d.feed([10])                                               # does not fit: restart with 4
    assert model.calls[-1] == [7, 8, 9, 10]
    for t in range(11, 15):
        d.feed([t])
    assert model.calls[-1] == list(range(7, 15))               # full again
    d.feed([15])
    assert model.calls[-1] == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="keep must be in"):
        g.Decoder(model, use_cache=False, keep=9)


def test_generate_yields_tokens_stops_and_counts():
    model = Recorder(vocab_size=16, block_size=8)
    out = list(g.generate(model, [3], g.Sampling(temperature=0, max_new_tokens=20), False))
    assert out == [(4 + i) % 16 for i in range(20)]
    out = list(g.generate(model, [3], g.Sampling(temperature=0, stop_tokens=(7,)), False))
    assert out == [4, 5, 6]
    assert list(g.generate(model, [3], g.Sampling(max_new_tokens=0), False)) == []
    with pytest.raises(ValueError, match="the prompt is empty"):
        list(g.generate(model, [], g.Sampling(), False))


# --- the KV cache: the same tokens and logits as recomputing everything -----------------

def tiny_model(style: str, attention: str, seed: int = 0):
    import dataclasses
    from llm.model import GPT, PRESETS
    config = dataclasses.replace(PRESETS["tiny"], attention=attention, dropout=0.0)
    if style == "llama":
        config = dataclasses.replace(config, pos="rope", norm="rmsnorm", mlp="swiglu",
                                     bias=False, tie_weights=False, n_kv_heads=2)
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():           # large weights: logits of order 1-10, so errors would show
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


MODELS = [(style, attention) for style in ("gpt2", "llama") for attention in ("explicit", "sdpa")]


@pytest.mark.parametrize("style, attention", MODELS)
def test_cache_gives_the_same_logits_and_tokens(style, attention):
    model = tiny_model(style, attention)
    T = model.config.block_size                                 # 32: the window restarts
    with_cache, without = g.Decoder(model, True), g.Decoder(model, False)
    prompt = torch.randint(0, model.config.vocab_size, (5,)).tolist()
    a, b = with_cache.feed(prompt), without.feed(prompt)
    steps = 0
    for _ in range(2 * T):                                      # crosses block_size twice
        assert b.abs().max() > 0.5                              # logits of real size
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
        token = int(b.argmax())
        a, b = with_cache.feed([token]), without.feed([token])
        steps += 1
    assert with_cache.window == without.window and len(with_cache.window) <= T
    s = g.Sampling(temperature=1.0, top_k=20, seed=7, max_new_tokens=3 * T)
    assert list(g.generate(model, prompt, s, True)) == list(g.generate(model, prompt, s, False))


@pytest.mark.parametrize("style, attention", MODELS)
def test_cache_reads_a_chunk_after_earlier_tokens(style, attention):
    """T new queries over S > T keys: the mask must be offset (a chat turn appended)."""
    model = tiny_model(style, attention, seed=1)
    with_cache, without = g.Decoder(model, True), g.Decoder(model, False)
    for chunk in ([1, 2, 3, 4], [5, 6, 7], [8], [9, 10, 11, 12, 13]):
        a, b = with_cache.feed(chunk), without.feed(chunk)
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    assert with_cache.cache.pos == 13


def test_cache_memory_formula_matches_what_is_allocated():
    from llm.model import KVCache, PRESETS
    for name, config in PRESETS.items():
        if config.n_layers * config.block_size * config.d_model > 2e7:
            continue                                             # do not allocate big caches
        cache = KVCache(config, batch_size=2)
        allocated = sum(t.numel() * t.element_size() for layer in cache.layers
                        for t in (layer.k, layer.v))
        assert allocated == g.kv_cache_bytes(config, config.block_size, batch_size=2), name
    gpt2 = PRESETS["gpt2"]
    assert g.kv_cache_bytes(gpt2) == 2 * 12 * 12 * 64 * 4 == 73_728
    llama = PRESETS["llama-small"]                              # 4 key/value heads of 12
    assert g.kv_cache_bytes(llama) * 3 == g.kv_cache_bytes(gpt2)


def test_cache_refuses_to_overflow():
    from llm.model import KVCache
    model = tiny_model("gpt2", "sdpa")
    cache = KVCache(model.config)
    model(torch.zeros(1, 32, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# --- text in, text out -----------------------------------------------------------------------

def char_model(specials=("<|endoftext|>",)):
    import dataclasses
    from llm.model import GPT, PRESETS
    from llm.tokenizer import CharTokenizer
    tok = CharTokenizer.train("To be, or not to be: that is the question.\n", specials)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model, tok


def test_show_streams_what_generate_makes_and_cuts_at_stop_strings(capsys):
    import io
    model, tok = char_model()
    s = g.Sampling(seed=3, max_new_tokens=40)
    ids = list(g.generate(model, tok.encode("To be"), s))
    full = tok.decode(ids)
    out = io.StringIO()
    assert g.show(model, tok, "To be", s, out=out) == full
    assert out.getvalue() == full + "\n"
    assert "40 tokens in" in capsys.readouterr().err
    stop = full[10:12]
    s = g.Sampling(seed=3, max_new_tokens=40, stop_strings=(stop,))
    out = io.StringIO()
    assert g.show(model, tok, "To be", s, out=out) == full[:full.index(stop)]


def test_empty_prompt_starts_a_document_or_is_refused():
    import io
    model, tok = char_model()
    s = g.Sampling(seed=0, max_new_tokens=5)
    assert len(g.show(model, tok, "", s, out=io.StringIO())) == 5
    assert g.start_tokens(tok) == [tok.eot_id]
    model, tok = char_model(specials=())
    with pytest.raises(ValueError, match="no <|endoftext|> token"):
        g.show(model, tok, "", s, out=io.StringIO())


# --- the command ---------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path):
    """A run folder with one checkpoint of a tiny character-level model."""
    train = pytest.importorskip("llm.train")       # checkpoints are Part III's
    TrainConfig, save_checkpoint = train.TrainConfig, train.save_checkpoint
    model, tok = char_model()
    tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 5, model, TrainConfig(), tmp_path / "tokenizer.json", {})
    return tmp_path / "run"


def cli(*args: str) -> int:
    from llm.__main__ import main
    return main(["generate", *args])


def test_cli_streams_the_same_text_as_the_api(run_dir, capsys):
    assert cli("--checkpoint", str(run_dir), "--prompt", "To be", "--max-new-tokens", "30",
               "--seed", "4", "--top-k", "10", "--stop", "\\n\\n") == 0
    out = capsys.readouterr()
    model, tok = char_model()
    s = g.Sampling(temperature=0.8, top_p=0.95, top_k=10, seed=4, max_new_tokens=30,
                   stop_strings=("\n\n",), stop_tokens=(tok.eot_id,))
    import io
    expected = g.show(model, tok, "To be", s, out=io.StringIO())
    assert out.out == "To be" + expected + "\n"
    assert "tokens/s, KV cache on" in out.err
    assert cli("--checkpoint", str(run_dir), "--prompt", "To be", "--max-new-tokens", "30",
               "--seed", "4", "--top-k", "10", "--stop", "\\n\\n", "--no-cache") == 0
    assert capsys.readouterr().out == out.out


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.01"], "top-p must be in (0, 1], got 1.01"),
    (["--temperature", "-0.5"], "--temperature must be in [0, inf), got -0.5"),
    (["--top-k", "0"], "--top-k must be in [1, inf)"),
    (["--presence-penalty", "inf"], "--presence-penalty must be in (-inf, inf), got inf"),
    (["--frequency-penalty", "nan"], "--frequency-penalty must be in (-inf, inf), got nan"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be in [0, inf), got -1"),
    (["--prompt", "Zebra"], "character 'Z'"),
])
def test_cli_bad_flags_give_one_clear_line(run_dir, capsys, flags, message):
    assert cli("--checkpoint", str(run_dir), *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m llm generate: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_missing_checkpoint_and_empty_prompt(tmp_path, capsys):
    pytest.importorskip("llm.train")
    assert cli("--checkpoint", str(tmp_path / "nowhere")) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    from llm.train import TrainConfig, save_checkpoint
    model, tok = char_model(specials=())
    tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", 1, model, TrainConfig(), tmp_path / "tokenizer.json", {})
    assert cli("--checkpoint", str(tmp_path / "run")) == 2
    assert "the prompt is empty and the tokenizer has no <|endoftext|>" in capsys.readouterr().err


def test_cli_interactive_loop(run_dir, capsys, monkeypatch):
    lines = iter(["To be", "Zzz", "not"])

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert cli("--checkpoint", str(run_dir), "--interactive", "--max-new-tokens", "5",
               "--temperature", "0") == 0
    out = capsys.readouterr()
    assert out.out.count("\n") == 2                 # two continuations
    assert "error: character 'Z'" in out.err        # the bad line is reported, the loop goes on
