"""Evaluation: perplexity by hand, sliding windows, multiple choice, HellaSwag, Wilson, the CLI."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llm import bigram, data, evaluate, model, train
from llm.tokenizer import CharTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (conftest's one_thread)."""


def table_model(probs: list[list[float]]) -> bigram.Bigram:
    """A bigram model whose row a is the given distribution of the token after a."""
    m = bigram.Bigram(len(probs))
    with torch.no_grad():
        m.table.weight.copy_(torch.tensor(probs).log())
    return m.eval()


def tiny_gpt(vocab_size: int = 50, block_size: int = 8) -> model.GPT:
    torch.manual_seed(0)
    config = dataclasses.replace(model.PRESETS["tiny"], vocab_size=vocab_size,
                                 block_size=block_size)
    return model.GPT(config).eval()


# --- loss, perplexity, bits per byte ------------------------------------------------------

def test_perplexity_is_exp_of_mean_loss_on_a_hand_computed_case():
    m = table_model([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    ids = [0, 1, 2, 1]                            # p(1|0) p(2|1) p(1|2) = 0.5 * 0.25 * 0.8 = 0.1
    for stride in (1, 2, 3):                      # a bigram model needs no more context
        s = evaluate.score_ids(m, ids, 3, context=3, stride=stride, batch_size=2,
                               device="cpu", progress=False)
        assert s.tokens == 3 and s.nats == pytest.approx(math.log(10))
        assert s.loss == pytest.approx(math.log(10) / 3)
        assert s.perplexity == pytest.approx(10 ** (1 / 3)) == math.exp(s.loss)
        assert s.bpb == pytest.approx(math.log2(10) / 3)     # 3 tokens of one byte each


def test_bits_per_byte_of_a_uniform_model_is_log2_V_times_tokens_per_byte():
    text = "héllo wörld, ça va?\n" * 3                # multi-byte characters: tokens != bytes
    tok = CharTokenizer.train(text)
    m = bigram.Bigram(tok.vocab_size).eval()       # a zero table: every token equally likely
    s = evaluate.score_text(m, tok, text, context=8, stride=5)
    n_tokens, n_bytes = len(tok.encode_ordinary(text)), len(text.encode("utf-8"))
    assert (s.tokens, s.bytes) == (n_tokens, n_bytes) and n_tokens < n_bytes
    assert s.bpb == pytest.approx(math.log2(tok.vocab_size) * n_tokens / n_bytes)
    assert s.perplexity == pytest.approx(tok.vocab_size)


# --- sliding windows ----------------------------------------------------------------------

@pytest.mark.parametrize("n, C, S", [(1, 8, 8), (5, 8, 3), (40, 8, 8), (41, 8, 3),
                                     (100, 16, 1), (37, 7, 5)])
def test_every_token_is_scored_once_with_at_least_C_minus_S_plus_1_of_context(n, C, S):
    scored, done = [], 0
    for i, (begin, end) in enumerate(evaluate.sliding_windows(n, C, S)):
        assert end - begin == min(C, n)                # windows stack into one batch
        for t in range(done + 1, end + 1):
            scored.append(t)
            assert t - begin <= C
            if i > 0:
                assert t - begin >= C - S + 1
        done = end
    assert scored == list(range(1, n + 1))            # each target once, in order


def test_bad_strides_are_refused():
    for stride in (0, 9):
        with pytest.raises(ValueError, match="stride must be in"):
            evaluate.sliding_windows(20, 8, stride)


def test_stride_equal_to_the_block_is_non_overlapping_chunks():
    m, C = tiny_gpt(), 8
    ids = torch.randint(0, 50, (5 * C + 1,), generator=torch.Generator().manual_seed(1))
    got = evaluate.token_logprobs(m, ids.tolist(), C, C, batch_size=2)
    with torch.no_grad():
        x, y = ids[:-1].view(5, C), ids[1:].view(5, C)
        want = torch.log_softmax(m(x)[0], -1).gather(-1, y[..., None])[..., 0].flatten()
    np.testing.assert_allclose(got, want.double().numpy(), atol=1e-5)


def test_stride_one_predicts_each_token_from_the_full_context():
    m, C = tiny_gpt(), 8
    ids = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    got = evaluate.token_logprobs(m, ids, C, 1, batch_size=4)
    with torch.no_grad():
        want = [torch.log_softmax(m(torch.tensor([ids[max(0, t - C):t]]))[0][0, -1], -1)[ids[t]]
                for t in range(1, len(ids))]
    np.testing.assert_allclose(got, torch.stack(want).double().numpy(), atol=1e-5)


# --- multiple choice ----------------------------------------------------------------------

def abc_model():
    tok = CharTokenizer.train("abcé")              # ids: a b c é, then <|endoftext|>
    probs = [[0.1, 0.6, 0.2, 0.05, 0.05],           # after a: mostly b
             [0.6, 0.1, 0.2, 0.05, 0.05],           # after b: mostly a
             [0.3, 0.3, 0.3, 0.05, 0.05],
             [0.3, 0.3, 0.3, 0.05, 0.05],
             [0.2, 0.2, 0.2, 0.2, 0.2]]
    return table_model(probs), tok


def test_multiple_choice_picks_the_planted_answer():
    m, tok = abc_model()
    items = [evaluate.Item("ab", ["ab", "cc", "éé", "bb"], 0),
             evaluate.Item("ba", ["cc", "éa", "ba", "aa"], 2)]
    rows = evaluate.score_endings(m, tok, items, context=16, batch_size=3)
    for norm in evaluate.NORMS:
        assert evaluate.choices(rows, norm).tolist() == [0, 2]
    acc = evaluate.accuracy(rows, items)
    assert acc["per_byte"]["correct"] == 2 and acc["chance"] == 0.25
    assert rows[0][:, 0][0] == pytest.approx(math.log(0.6 * 0.6))     # after b: a, then b
    assert rows[0][2].tolist()[1:] == [2, 4]                           # é is 2 bytes


def test_normalising_removes_the_bias_toward_short_endings():
    m, tok = abc_model()
    item = evaluate.Item("a", ["babab", "c"], 0)    # 5 likely tokens against 1 unlikely one
    rows = evaluate.score_endings(m, tok, [item], context=16)
    assert rows[0][0, 0] == pytest.approx(5 * math.log(0.6))
    assert evaluate.choices(rows, "sum").tolist() == [1]              # the short, wrong one
    assert evaluate.choices(rows, "per_token").tolist() == [0]
    assert evaluate.choices(rows, "per_byte").tolist() == [0]


def test_endings_that_do_not_fit_are_refused():
    m, tok = abc_model()
    with pytest.raises(ValueError, match="item 1: an ending must be 1 to 3 tokens"):
        evaluate.score_endings(m, tok, [evaluate.Item("ab", ["abab", "a"], 0)], context=4)


def test_padding_does_not_change_a_causal_models_scores():
    m = tiny_gpt()
    pairs = [([1, 2, 3, 4, 5, 6], 2), ([7, 8, 9], 1)]
    together = evaluate.pair_sums(m, pairs, 2, "cpu", False)
    alone = [evaluate.pair_sums(m, [p], 1, "cpu", False)[0] for p in pairs]
    assert together == pytest.approx(alone, abs=1e-5)


def test_wilson_interval():
    z = 1.959963984540054
    for k, n in [(1, 10), (200, 500), (37, 40)]:
        low, high = evaluate.wilson_interval(k, n)
        p = k / n
        for end in (low, high):                          # both ends solve |p - e| = z sd(e)
            assert abs(p - end) == pytest.approx(z * math.sqrt(end * (1 - end) / n))
        assert (1 - high, 1 - low) == pytest.approx(evaluate.wilson_interval(n - k, n))
    assert evaluate.wilson_interval(0, 20) == pytest.approx((0, z * z / (20 + z * z)))
    with pytest.raises(ValueError):
        evaluate.wilson_interval(3, 2)


# --- HellaSwag and our own task -----------------------------------------------------------

def test_hellaswag_loader(tmp_path):
    rows = [{"ind": 4, "ctx": "A man is sitting on a roof. He ", "label": 3,
             "endings": ["is using wrap.", "is ripping level tiles off.", "holds a rubik's cube.",
                         "starts pulling up roofing."]},
            {"ctx": "The dog", "endings": ["barks.", " sleeps."], "label": "1"}]
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    items = evaluate.load_hellaswag(path)
    assert items[0] == evaluate.Item("A man is sitting on a roof. He",
                                     [" " + e for e in rows[0]["endings"]], 3)
    assert items[1] == evaluate.Item("The dog", [" barks.", " sleeps."], 1)
    bad = {2: "{not json", 1: json.dumps({**rows[1], "label": 2}),
           3: json.dumps({"ctx": "x", "endings": "abc", "label": 0})}
    for line, text in bad.items():
        path.write_text("\n".join([json.dumps(rows[1])] * (line - 1) + [text]) + "\n")
        with pytest.raises(ValueError, match=f"hs.jsonl:{line}: not a HellaSwag question"):
            evaluate.load_hellaswag(path)


def play(d: int, n: int) -> str:
    return "".join(f"Line {i} of play {d}, spoken at some length.\n" for i in range(n))


def test_shakespeare_task_is_seeded_balanced_and_never_uses_seen_lines():
    documents = [play(d, 40) for d in range(3)]
    seen = {"Line 20 of play 1, spoken at some length."}
    items = evaluate.shakespeare_mc(documents, seen, 12, seed=0)
    assert items == evaluate.shakespeare_mc(documents, seen, 12, seed=0)
    assert items != evaluate.shakespeare_mc(documents, seen, 12, seed=1)
    assert sorted(item.label for item in items) == sorted([0, 1, 2, 3] * 3)
    for item in items:
        right = item.endings[item.label]
        home = next(d for d in documents if item.context + right + "\n" in d)
        assert len(item.context) <= evaluate.MC_PASSAGE_CHARS and item.context.endswith("\n")
        assert all(e not in home for j, e in enumerate(item.endings) if j != item.label)
        assert len(set(item.endings)) == 4 and not seen & set(item.endings)


# --- the command --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    text = (ROOT / "llm.org").read_text(encoding="utf-8")[:60_000]
    documents = [(f"part{i}", text[i * 20_000:(i + 1) * 20_000]) for i in range(3)]
    out = tmp_path_factory.mktemp("data") / "tiny"
    data.prepare(out, documents, source="llm.org", tokenizer="char", progress=False)
    return out


def test_the_bigram_baseline_scores_the_val_split_as_bigram_loss_does(folder):
    m, tok = evaluate.bigram_model(folder, 0.01)
    s = evaluate.score_data(m, tok, folder, 64, 32, batch_size=4)
    meta = data.read_meta(folder)
    assert (s.tokens, s.bytes) == (meta["val_tokens"], meta["val_bytes"])
    val = data.load_tokens(folder, "val")
    direct = bigram.bigram_loss(m.table.weight.detach(), val)      # pairs of val alone
    first = -m.table.weight[meta["eot_id"], int(val[0])].item()      # + the first token
    assert s.nats == pytest.approx(direct * (len(val) - 1) + first, rel=1e-5)
    # A model with another tokenizer reads the decoded documents, on the same bytes.
    other = CharTokenizer(set("".join(evaluate.split_documents(folder, "val"))) | {"§"})
    assert other.to_dict() != load_tokenizer(folder).to_dict()
    s2 = evaluate.score_data(bigram.Bigram(other.vocab_size), other, folder, 64, 64)
    assert s2.bytes == meta["val_bytes"]
    assert s2.bpb == pytest.approx(math.log2(other.vocab_size) * s2.tokens / s2.bytes)


def test_eval_command_with_a_checkpoint(folder, tmp_path, capsys):
    from llm.__main__ import main
    cfg = train.TrainConfig(preset="tiny", data=str(folder), out=str(tmp_path / "run"),
                            max_steps=2, warmup_steps=0, eval_every=2, eval_batches=1,
                            batch_size=4, micro_batch=4, sample_tokens=0)
    train.train(cfg, dataclasses.replace(model.PRESETS["tiny"], block_size=128))
    text = tmp_path / "a.txt"
    text.write_text("Every code block is explained by prose before it.\n" * 3)
    out = tmp_path / "scores.json"
    argv = ["eval", "--checkpoint", str(tmp_path / "run"), "--text", str(text), "--stride", "8",
            "--data", str(folder), "--task", "shakespeare-mc", "--items", "8", "--json", str(out)]
    with pytest.raises(SystemExit):                # --text and --data: one or the other
        main(argv)
    assert "not allowed with argument" in capsys.readouterr().err
    argv.pop(argv.index("--text") + 1)
    argv.remove("--text")
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["context"] == 128 and report["stride"] == 8
    (score,) = report["scores"].values()
    assert score["tokens"] == data.read_meta(folder)["val_tokens"]
    assert score["perplexity"] == pytest.approx(math.exp(score["loss"]))
    assert report["task"]["items"] == 8 and report["task"]["chance"] == 0.25


@pytest.mark.parametrize("flags, message", [
    (["--stride", "0"], "--stride must be at least 1, got 0"),
    (["--stride", "300"], "--stride 300 is longer than the model's context of 256"),
    (["--items", "0", "--task", "shakespeare-mc"], "--items must be at least 1"),
    (["--alpha", "-1"], "--alpha must be a number >= 0"),
    (["--alpha", "nan"], "--alpha must be a number >= 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seed", "-3", "--task", "shakespeare-mc"], "--seed must be at least 0"),
    (["--text", "missing.txt"], "missing.txt: no such file"),
    (["--hellaswag", "BAD"], "hs.jsonl:2: not a HellaSwag question"),
    (["--json", "no/such/folder/x.json"], "not a file in an existing folder"),
    (["--json", "."], "--json .: not a file in an existing folder"),
])
def test_bad_input_is_one_line_before_any_work(folder, tmp_path, capsys, monkeypatch,
                                               flags, message):
    from llm.__main__ import main
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "hs.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n{"ctx": \n')
    flags = [str(bad) if f == "BAD" else f for f in flags]
    base = ["eval", "--bigram", str(folder)]
    if "--text" not in flags and "--hellaswag" not in flags:
        base += ["--data", str(folder)]
    assert main(base + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m llm eval: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_missing_inputs_name_what_is_missing(tmp_path, capsys):
    from llm.__main__ import main
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--text", __file__]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["eval", "--bigram", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "meta.json does not exist" in capsys.readouterr().err
    assert main(["eval", "--bigram", str(tmp_path)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
