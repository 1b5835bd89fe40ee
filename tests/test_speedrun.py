"""The speedrun: a stand-in text in tiny Shakespeare's format, a run stopped by the clock,
a loss over every held-out character, and one-line refusals."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from llm import model, speedrun
from llm.__main__ import main

PLAY = """THE TRAGEDY OF X

PERSONS REPRESENTED.

ROMEO, a youth

ACT I.

SCENE I. Verona. A street.

[Enter ROMEO and Lady Capulet,
with servants.]

ROMEO.
But soft, what light [Aside.] breaks?
Yon window.

Lady Capulet.
It is the east.

[Exit.]
"""


def test_a_play_in_tiny_shakespeares_format():
    assert speedrun.plain_play(PLAY) == ("ROMEO:\nBut soft, what light breaks?\nYon window.\n\n"
                                         "Lady Capulet:\nIt is the east.\n\n")


def test_held_out_loss_scores_every_token_once():
    torch.manual_seed(0)
    net = model.GPT(model.GPTConfig(vocab_size=11, block_size=8, n_layers=1, n_heads=2,
                                    d_model=16)).eval()
    ids = torch.randint(0, 11, (30,))                      # 29 targets: 3 windows of 8, then 5
    expected = 0.0
    for s in range(0, 29, 8):
        x, y = ids[s:min(s + 8, 29)], ids[s + 1:min(s + 9, 30)]
        expected += F.cross_entropy(net(x[None])[0][0], y, reduction="sum").item()
    assert speedrun.held_out_loss(net, ids, batch=2) == pytest.approx(expected / 29, rel=1e-6)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "play.txt"
    path.write_text((PLAY * 3 + speedrun.plain_play(PLAY)) * 60)   # about 20 kB
    return path


def test_a_speedrun_stops_on_the_clock_and_scores_the_whole_split(text, tmp_path, capsys):
    report = tmp_path / "report.json"
    got = main(["speedrun", "--text", str(text), "--budget", "2", "--row", "0", "--threads", "1",
                "--out", str(tmp_path / "sr"), "--json", str(report)])
    assert got == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    meta = json.loads((tmp_path / "sr" / "data" / "meta.json").read_text())
    assert r["scored"] == meta["val_tokens"] - 2          # all but the first and <|endoftext|>
    assert 2.0 <= r["seconds"] < 20 and r["steps"] >= 1
    assert math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(meta["vocab_size"])
    assert f"val loss {r['val_loss']:.4f} nats per character" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--text", "no/such.txt"], "--text no/such.txt: no such file"),
    (["--budget", "0"], "--budget must be in (0, inf), got 0.0"),
    (["--budget", "nan"], "--budget must be in (0, inf), got nan"),
    (["--row", "99"], "--row 99: the recipe has rows 0 to")])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    assert main(["speedrun", "--out", str(tmp_path / "sr"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "python -m llm speedrun: error:" in err
    assert not (tmp_path / "sr").exists()


def test_a_text_too_short_is_one_line(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n" * 3)
    assert main(["speedrun", "--text", str(short), "--out", str(tmp_path / "sr")]) == 2
    err = capsys.readouterr().err
    assert "python -m llm speedrun: error:" in err and "Traceback" not in err


def test_a_compiled_row_without_a_compiler_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(speedrun.shutil, "which", lambda name: None)
    row = next(k for k, (_, changes, _) in enumerate(speedrun.RECIPE) if changes.get("compile"))
    assert main(["speedrun", "--row", str(row), "--out", str(tmp_path / "sr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a C++ compiler" in err
    assert not (tmp_path / "sr").exists()
