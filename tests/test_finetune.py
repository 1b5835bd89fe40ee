"""Finetuning: speeches read from a play, the split, a classifier that learns a planted task,
right padding that changes nothing, and the commands' one-line errors."""
import dataclasses
import math
import random
import re
import subprocess

import pytest
import torch

from llm import finetune as ft, model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (conftest's one_thread)."""


def tiny_gpt(vocab_size: int = 16, seed: int = 0, **changes) -> model.GPT:
    torch.manual_seed(seed)
    config = dataclasses.replace(model.PRESETS["tiny"], vocab_size=vocab_size, **changes)
    return model.GPT(config)


PLAY = """THE TRAGEDY OF A TEST

ACT I.

Scene I. A room.

[Enter ROMEO and the Nurse.]

ROMEO.
But soft, what light
through yonder window breaks?

First Citizen.
[Aside] Aside to no one.
Speak, speak.

THESEUS
No full stop after my name.

ACT II.

HAMLET.
To be, or not to be.
"""


def test_speeches_are_read_with_speaker_and_split():
    speeches = ft.play_speeches("hamlet", PLAY, test_fraction=0.15)
    assert [(s.speaker, s.text) for s in speeches] == [
        ("ROMEO", "But soft, what light\nthrough yonder window breaks?"),
        ("FIRST CITIZEN", "[Aside] Aside to no one.\nSpeak, speak."),
        ("THESEUS", "No full stop after my name."),
        ("HAMLET", "To be, or not to be.")]
    assert [s.split for s in speeches] == ["train", "train", "train", "test"]   # the last 15%


def test_genre_examples_are_balanced_and_from_one_split():
    speeches = [ft.Speech(play, "X", f"{play} {split} {i} " + "word " * 30, split)
                for play in ("hamlet", "tempest", "henry_v") for i in range(20)
                for split in ("train", "test")]
    train = ft.genre_examples(speeches, "train", 5, seed=0)
    assert sorted(y for _, y in train) == [0] * 5 + [1] * 5 + [2] * 5
    assert all(ft.PLAYS[text.split()[0]][1] == ft.GENRES[y] for text, y in train)
    assert train == ft.genre_examples(speeches, "train", 5, seed=0)        # seeded
    test = ft.genre_examples(speeches, "test", 100, seed=1)
    assert len(test) == 60 and all(text.split()[1] == "test" for text, _ in test)


def test_right_padding_leaves_the_last_real_token_alone():
    net = tiny_gpt().eval()
    rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    ids, lengths = ft.pad(rows, value=0)
    assert ids.tolist()[2] == [10, 0, 0, 0, 0, 0] and lengths.tolist() == [3, 6, 1]
    batched = ft.class_logits(ft.make_classifier(net, 3), ids, lengths)
    for i, row in enumerate(rows):
        alone = ft.class_logits(net, torch.tensor([row]), torch.tensor([len(row)]))
        assert torch.allclose(batched[i], alone[0], atol=1e-6)


def planted(n: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """Class k: a row of noise tokens (4..15) with token k somewhere in it."""
    rows = []
    for _ in range(n):
        k, row = rng.randrange(3), [rng.randrange(4, 16) for _ in range(rng.randrange(4, 12))]
        row.insert(rng.randrange(len(row) + 1), k)
        rows.append((row, k))
    return rows


def test_a_classifier_learns_a_planted_separable_task():
    rng = random.Random(0)
    train, test = planted(300, rng), planted(90, rng)
    net = ft.make_classifier(tiny_gpt(), 3)
    params = ft.choose_trainable(net, "all")
    net.train()
    costs = ft.finetune_steps(params, lambda step: ft.classifier_loss(net, train, 32, rng, 15),
                              steps=80, lr=3e-3, desc="test")
    guesses = ft.predict(net, [ids for ids, _ in test], pad_id=15)
    accuracy = sum(g == y for g, (_, y) in zip(guesses, test)) / len(test)
    assert accuracy >= 0.97, accuracy
    assert costs["losses"][-1] < 0.2 < costs["losses"][0]
    assert costs["optimizer_bytes"] == 2 * 4 * sum(p.numel() for p in params)   # m and v, fp32


def test_top_and_lora_modes_train_what_they_say():
    net = ft.make_classifier(tiny_gpt(), 3)
    top = ft.choose_trainable(net, "top")
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("blocks.1.", "norm_f.", "lm_head.")) for n in names)
    assert len(top) == len(names)
    net = ft.make_classifier(tiny_gpt(), 3)
    ft.choose_trainable(net, "lora", rank=2, alpha=4)
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(n.endswith((".A", ".B")) or n.startswith("lm_head.") for n in names)
    with pytest.raises(ValueError, match="unknown training mode"):
        ft.choose_trainable(net, "half")


def test_naive_bayes_separates_a_planted_task():
    rng = random.Random(1)
    train, test = planted(200, rng), planted(60, rng)
    bayes = ft.naive_bayes(train, V=16, k=3)
    assert sum(bayes(ids) == y for ids, y in test) / len(test) >= 0.95


def run_llm(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m llm ARGS`, run in this process (a new Python would import torch again)."""
    from llm.__main__ import main
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_the_commands_fail_in_one_line(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run_llm(capsys, "finetune", "classify", "--checkpoint", str(tmp_path), "--out", str(out),
                "--overwrite")
    assert r.returncode == 2 and "not made by" in r.stderr and len(r.stderr.splitlines()) == 1
    assert (out / "precious.txt").read_text() == "keep me"
    r = run_llm(capsys, "finetune", "classify", "--checkpoint", str(tmp_path / "none"),
                "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and "no checkpoint at" in r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "new").exists()
    r = run_llm(capsys, "finetune", "classify", "--checkpoint", "x", "--out", "y", "--steps", "0")
    assert r.returncode == 2 and "--steps must be >= 1" in r.stderr


# --- instructions: the template, the masked loss, the chat memory -------------------------

def chat_tokenizer():
    from llm.tokenizer import BPETokenizer, EOT
    tok = BPETokenizer.train("to be or not to be, that is the question " * 20, 300,
                             special_tokens=(EOT,))
    net = tiny_gpt(vocab_size=tok.vocab_size, block_size=64)
    return net, ft.add_chat_tokens(net, tok)


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who says <|end|> to be?"},
                {"role": "assistant", "content": "HAMLET"}]


def test_the_template_round_trips_through_the_tokenizer(tmp_path):
    net, tok = chat_tokenizer()
    V = tok.vocab_size - 4                                          # before the chat tokens
    assert [tok.special_tokens[t] for t in ft.CHAT_TOKENS] == [V, V + 1, V + 2, V + 3]
    assert net.config.vocab_size == V + 4 and net.tok_emb.weight.shape[0] == V + 4
    assert net.lm_head.weight is net.tok_emb.weight                # still tied
    assert torch.allclose(net.tok_emb.weight[V + 3], net.tok_emb.weight[:V].mean(0))
    ids, learn = ft.encode_chat(tok, CONVERSATION)
    assert tok.decode(ids) == ft.render(CONVERSATION)
    assert ids.count(tok.special_tokens["<|end|>"]) == 3   # the typed "<|end|>" is plain text
    tok.save(tmp_path / "tokenizer.json")
    from llm.tokenizer import load_tokenizer
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.special_tokens == tok.special_tokens
    assert ft.encode_chat(again, CONVERSATION) == (ids, learn)
    answer = [i for i, keep in zip(ids, learn) if keep]
    assert tok.decode(answer) == "HAMLET<|end|>"


def test_the_answer_mask_zeroes_the_loss_on_prompt_tokens():
    net, tok = chat_tokenizer()
    x, y = ft.chat_example(tok, CONVERSATION)
    answer = [i for i, t in enumerate(y) if t != ft.IGNORE]
    assert [tok.decode([y[i]]) for i in answer][-1] == "<|end|>"
    assert len(x) == len(y) and x[answer[0]] == tok.special_tokens["<|assistant|>"]
    # by hand: V = 3, two positions, the first masked; loss = -log softmax(z)[y] of the second
    logits = torch.tensor([[[5.0, 1.0, 0.0], [1.0, 2.0, 3.0]]])
    targets = torch.tensor([[ft.IGNORE, 1]])
    expected = -(2.0 - torch.log(torch.exp(torch.tensor([1.0, 2.0, 3.0])).sum()))
    assert torch.allclose(ft.masked_loss(logits, targets), expected)
    logits.requires_grad_(True)
    ft.masked_loss(logits, targets).backward()
    assert torch.equal(logits.grad[0, 0], torch.zeros(3))        # no gradient from the prompt


def test_a_padded_batch_gives_each_conversation_its_own_loss():
    net, tok = chat_tokenizer()
    short = ft.chat_example(tok, CONVERSATION[1:])
    long = ft.chat_example(tok, CONVERSATION)
    ids, targets = ft.chat_batch([short, long], pad_id=0)
    assert (targets[0, len(short[1]):] == ft.IGNORE).all()
    net.eval()
    logits, _ = net(ids)
    alone, _ = net(torch.tensor([short[0]]))
    assert torch.allclose(logits[0, :len(short[0])], alone[0], atol=1e-5)


def test_chat_memory_drops_the_oldest_whole_turns_first():
    from llm.chat import fit_turns
    turns = [[1] * 5, [2] * 3, [3] * 4, [4] * 2]
    assert fit_turns(turns, 100) == turns
    assert fit_turns(turns, 6) == [[3] * 4, [4] * 2]
    assert fit_turns(turns, 8) == [[3] * 4, [4] * 2]            # [2]*3 would not fit whole
    assert fit_turns(turns, 9) == [[2] * 3, [3] * 4, [4] * 2]
    assert fit_turns(turns, 11, keep_first=True) == [[1] * 5, [3] * 4, [4] * 2]
    assert fit_turns(turns, 10, keep_first=True) == [[1] * 5, [4] * 2]   # the system turn stays
    assert fit_turns(turns, 1) == []


def test_a_chat_answers_within_the_window_and_remembers():
    from llm.chat import Chat
    from llm.generate import Sampling
    net, tok = chat_tokenizer()
    net.eval()
    chat = Chat(net, tok, Sampling(temperature=0, max_new_tokens=4), system="Be brief.")
    for _ in range(4):
        chat.say("to be or not to be")
    assert len(chat.turns) == 1 + 2 * 4 and chat.turns[0][0] == tok.special_tokens["<|system|>"]
    assert all(t[-1] == tok.special_tokens["<|end|>"] for t in chat.turns)


def test_conversations_load_from_jsonl_with_errors_naming_the_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "Name a play.", "input": "", "output": "Hamlet"}\n\n'
                    '{"messages": [{"role": "user", "content": "Hi"}, '
                    '{"role": "assistant", "content": "Well met."}]}\n')
    assert ft.load_conversations(good) == [
        [{"role": "user", "content": "Name a play."}, {"role": "assistant", "content": "Hamlet"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well met."}]]
    cases = {'{"instruction": "x", "output": "y"}\n{"text": 1}\n': ":2: expected",
             '{"instruction": "x"': ":1: not JSON",
             '{"messages": [{"role": "robot", "content": "x"}]}': ":1: each message needs",
             '{"messages": [{"role": "user", "content": "x"}]}': ":1: no assistant message"}
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{bad}{message}")):
            ft.load_conversations(bad)


# --- DPO ------------------------------------------------------------------------------------

def test_dpo_loss_is_ln2_when_the_policy_is_the_reference():
    logp = torch.tensor([-3.0, -7.5, -1.25])
    loss, r_w, r_l = ft.dpo_loss(logp, logp - 2, logp, logp - 2, beta=0.1)
    assert torch.allclose(loss, torch.tensor(math.log(2)))
    assert torch.equal(r_w, torch.zeros(3)) and torch.equal(r_l, torch.zeros(3))


def test_dpo_loss_equals_a_hand_computed_value():
    # one pair: policy log p = -2 (chosen), -5 (rejected); reference -3 and -4; beta = 0.5
    # margin = 0.5 * ((-2 + 3) - (-5 + 4)) = 1.0; loss = -log sigmoid(1) = log(1 + e^-1)
    loss, r_w, r_l = ft.dpo_loss(torch.tensor([-2.0]), torch.tensor([-5.0]),
                                 torch.tensor([-3.0]), torch.tensor([-4.0]), beta=0.5)
    assert abs(loss.item() - math.log(1 + math.exp(-1))) < 1e-6        # 0.313262
    assert r_w.item() == 0.5 and r_l.item() == -0.5


def test_continuation_logprob_sums_the_answer_tokens_only():
    net = tiny_gpt().eval()
    prompts, answers = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    got = ft.continuation_logprob(net, prompts, answers, pad_id=0)
    for k, (p, a) in enumerate(zip(prompts, answers)):
        ids = torch.tensor([p + a])
        log_p = torch.log_softmax(net(ids)[0][0], -1)
        expected = sum(log_p[len(p) - 1 + i, tok] for i, tok in enumerate(a))
        assert torch.allclose(got[k], expected, atol=1e-5)


def test_preference_pairs_shuffle_the_true_next_line():
    speeches = [ft.Speech("hamlet", "HAMLET", "To be, or not to be,\nthat is the question: "
                          "whether 'tis nobler\nin the mind", "train"),
                ft.Speech("hamlet", "HAMLET", "Too short\nno no no no", "train")]
    [(prompt, chosen, rejected)] = ft.preference_pairs(speeches, "train", 5, seed=0)
    assert prompt == "HAMLET.\nTo be, or not to be,\n"
    assert chosen == "that is the question: whether 'tis nobler\n"
    assert rejected != chosen and sorted(rejected.split()) == sorted(chosen.split())
    w, r = chosen.split(), rejected.split()
    assert sum(a != b for a, b in zip(w, r)) == 2                # two neighbours swapped


def test_instruct_with_lora_writes_a_checkpoint_that_chats(tmp_path, capsys):
    import json
    import safetensors.torch
    from llm.chat import Chat
    from llm.generate import Sampling
    from llm.tokenizer import EOT, BPETokenizer
    from llm.train import load_checkpoint
    tok = BPETokenizer.train("to be or not to be, that is the question " * 20, 300,
                             special_tokens=(EOT,))
    net = tiny_gpt(vocab_size=tok.vocab_size, block_size=64)
    base = tmp_path / "base"
    base.mkdir()
    safetensors.torch.save_model(net, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"model": net.config.to_dict()}))
    tok.save(base / "tokenizer.json")
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n"
                            for w in ["to", "be", "or", "not", "that", "is"] * 4))
    out = tmp_path / "chat"
    r = run_llm(capsys, "finetune", "instruct", "--checkpoint", str(base), "--out", str(out),
                "--data", str(data), "--steps", "3", "--train", "lora", "--lora-rank", "2")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["train_examples"] == 22 and set(report["before"]) == {"answer_loss", "exact_all"}
    assert (out / "adapter.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
    chat_model, chat_tok, config = load_checkpoint(out)
    assert config.vocab_size == tok.vocab_size + 4 and "<|end|>" in chat_tok.special_tokens
    Chat(chat_model, chat_tok, Sampling(temperature=0, max_new_tokens=3)).say("say to")
    r = run_llm(capsys, "finetune", "instruct", "--checkpoint", str(base), "--out", str(out),
                "--data", str(data))
    assert r.returncode == 2 and "exists" in r.stderr                 # no --overwrite
