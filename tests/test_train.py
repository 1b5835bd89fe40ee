"""The training loop: accumulation, checkpointed blocks, a falling loss, exact resume, DDP, bad checkpoints."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm import data, model, optim, train
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "llm.org").read_text(encoding="utf-8")[:40_000]   # a small corpus at hand


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "tiny"
    data.prepare(folder, [("llm.org", TEXT)], source="the first 40 kB of llm.org",
                 tokenizer="bpe", vocab_size=320, progress=False)
    return folder


def tiny(data_dir: Path, out: Path, **changes) -> train.TrainConfig:
    """The tiny preset's training settings, shortened for a test."""
    settings = {**train.TRAIN_PRESETS["tiny"], "max_steps": 12, "warmup_steps": 2, "eval_every": 4,
                "eval_batches": 1, "log_every": 2, "sample_tokens": 0, **changes}
    return train.TrainConfig(preset="tiny", data=str(data_dir), out=str(out), **settings)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(train.find_checkpoint(run) / "model.safetensors"))


def tiny_model(**changes) -> model.GPT:
    torch.manual_seed(0)
    return model.GPT(dataclasses.replace(model.PRESETS["tiny"], vocab_size=50, **changes))


def test_accumulation_equals_one_big_batch():
    net = tiny_model()
    x = torch.randint(0, 50, (8, net.config.block_size), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    off = optim.DynamicLossScaler(enabled=False)
    train.accumulate_gradients(net, list(zip(x.split(2), y.split(2))), train.autocast(
        torch.device("cpu"), torch.float32), off, torch.device("cpu"))
    accumulated = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x, y)[1].backward()
    for a, b in zip(accumulated, net.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=1e-6)


def test_checkpointed_blocks_give_identical_gradients():
    grads = []
    for flag in (False, True):
        net = tiny_model(activation_checkpointing=flag)
        x = torch.randint(0, 50, (4, net.config.block_size), generator=torch.Generator().manual_seed(2))
        net(x, torch.roll(x, -1, dims=1))[1].backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_tiny_run_learns(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "run", max_steps=150, eval_every=150, eval_batches=4)
    result = train.train(cfg, model.PRESETS["tiny"])
    uniform = math.log(data.read_meta(data_dir)["vocab_size"])   # the loss of a uniform guess
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(records[0]["val_loss"] - uniform) < 0.3         # an untrained model knows nothing
    assert result["val_loss"] < uniform - 1.2                  # ln 320 = 5.77 -> about 4.1
    assert [r["step"] for r in records if "loss" in r] == list(range(2, 151, 2))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000


def test_kill_and_resume_is_bit_identical(data_dir, tmp_path, monkeypatch):
    train.train(tiny(data_dir, tmp_path / "straight"), model.PRESETS["tiny"])
    real_lr_at = train.lr_at

    def crash_at_step_6(step, *args):
        if step == 6:
            raise KeyboardInterrupt("killed")              # after the checkpoint of step 4
        return real_lr_at(step, *args)

    monkeypatch.setattr(train, "lr_at", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny(data_dir, tmp_path / "resumed"), model.PRESETS["tiny"])
    assert train.find_checkpoint(tmp_path / "resumed").name == "ckpt-0000004"
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    train.train(tiny(data_dir, tmp_path / "resumed"), model.PRESETS["tiny"], resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(steps)                            # what the crash lost was dropped


def test_two_process_ddp_equals_accumulation_two(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "one", batch_size=8, micro_batch=4, max_steps=4, eval_every=4)
    train.train(cfg, model.PRESETS["tiny"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "build"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llm", "train", "--preset", "tiny", "--data", str(data_dir), "--out", str(tmp_path / "two"),
           "--batch-size", "8", "--micro-batch", "4", "--max-steps", "4", "--warmup-steps", "2",
           "--eval-every", "4", "--eval-batches", "1", "--sample-tokens", "0", "--log-every", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    # bit for bit: halving is exact in binary floating point and a + b == b + a; with three or
    # more processes the sums would group differently and agree only to rounding
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_missing_and_corrupt_checkpoints(data_dir, tmp_path):
    with pytest.raises(train.CheckpointError, match="no checkpoint"):
        train.load_checkpoint(tmp_path / "nothing")
    with pytest.raises(train.CheckpointError, match="no checkpoint"):
        train.train(tiny(data_dir, tmp_path / "nothing"), model.PRESETS["tiny"], resume=True)
    run = tmp_path / "run"
    train.train(tiny(data_dir, run, max_steps=4), model.PRESETS["tiny"])
    loaded, tokenizer, config = train.load_checkpoint(run)
    assert config.vocab_size == tokenizer.vocab_size and not loaded.training
    st = train.find_checkpoint(run) / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])          # a torn write
    before = snapshot(run)
    with pytest.raises(train.CheckpointError, match="model.safetensors|not a readable"):
        train.train(tiny(data_dir, run, max_steps=8), model.PRESETS["tiny"], resume=True)
    with pytest.raises(train.RunError, match="--resume"):
        train.train(tiny(data_dir, run, max_steps=8), model.PRESETS["tiny"])
    assert snapshot(run) == before                                     # nothing overwritten


@pytest.mark.parametrize("dtype, scaler, optimizer", [("bfloat16", "ours", "torch"),
                                                       ("float16", "ours", "ours"),
                                                       ("float16", "torch", "torch")])
def test_mixed_precision_and_fast_paths_train(data_dir, tmp_path, dtype, scaler, optimizer):
    cfg = tiny(data_dir, tmp_path / "run", dtype=dtype, scaler=scaler, optimizer=optimizer,
               max_steps=20, eval_every=20)
    result = train.train(cfg, model.PRESETS["tiny"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["val_loss"] < records[0]["val_loss"] - 0.3
    assert all(torch.isfinite(w).all() for w in weights(tmp_path / "run").values())


@pytest.mark.parametrize("scaler", ["none", "ours"])
def test_float16_logs_the_loss_scale_and_skipped_steps(data_dir, tmp_path, monkeypatch, scaler):
    # A scale far too large, as the book's figure starts it: the first steps must overflow.
    monkeypatch.setitem(train.SCALER, "init_scale", 2.0 ** 24)
    monkeypatch.setitem(train.SCALER, "growth_interval", 3)
    cfg = tiny(data_dir, tmp_path / "run", dtype="float16", scaler=scaler, max_steps=12)
    train.train(cfg, model.PRESETS["tiny"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    scales = [r["loss_scale"] for r in steps]
    if scaler == "none":                             # no scaling: nothing skipped, scale 1
        assert scales == [1.0] * len(steps) and steps[-1]["skipped"] == 0
    else:
        assert steps[0]["skipped"] >= 1 and scales[0] < 2.0 ** 24       # halved on overflow
        assert steps[-1]["skipped"] < cfg.max_steps                      # and then it trains
        assert all(math.log2(s).is_integer() for s in scales)            # halved or doubled
        assert max(b / a for a, b in zip(scales, scales[1:])) == 2.0     # grew after 3 clean
    assert all(math.isfinite(r["loss"]) for r in steps)


def test_bad_settings_stop_before_training(tmp_path):
    with pytest.raises(ValueError, match="--warmup-steps must be below --max-steps=10, got 50"):
        train.TrainConfig(max_steps=10, warmup_steps=50)
    with pytest.raises(ValueError, match="multiple of --micro-batch"):
        train.TrainConfig(batch_size=24, micro_batch=16)
    with pytest.raises(train.RunError, match="python -m llm prepare"):
        train.train(train.TrainConfig(data=str(tmp_path / "none"), out=str(tmp_path / "run")),
                    model.PRESETS["tiny"])


def test_pick_device_refuses_unknown_and_missing_devices():
    from llm.train import pick_device
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda: not available here"):
            pick_device("cuda")


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    from llm.__main__ import main
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max-steps", "3", "--out", str(out)]) == 2
    assert "python -m llm train: error: --warmup-steps must be below --max-steps=3" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--device", "gpu", "--out", str(out)]) == 2
    assert "'gpu' is not a device" in capsys.readouterr().err
    assert not out.exists()


# --- issue 13: no command loses a run or trains silently wrong --------------------------------

def cli_train(*flags: str) -> int:
    from llm.__main__ import main
    return main(["train", *map(str, flags)])


def tiny_flags(data_dir: Path, out: Path, *more) -> list:
    return ["--preset", "tiny", "--data", data_dir, "--out", out, "--max-steps", 4,
            "--warmup-steps", 2, "--eval-every", 4, "--eval-batches", 1, "--log-every", 2,
            "--sample-tokens", 0, *more]


def one_line_error(capsys, status: int, got: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert got == status, err
    line = err.rstrip("\n").split("\n")[-1]       # after the progress bar, if it had started
    assert line.startswith("python -m llm train: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in line, err
    return line


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A tiny run trained to step 4: copy it, never change it."""
    run = tmp_path_factory.mktemp("runs") / "done"
    train.train(tiny(data_dir, run, max_steps=4), model.PRESETS["tiny"])
    return run


def copy_run(run: Path, to: Path) -> Path:
    import shutil
    shutil.copytree(run, to)
    return to


def test_overwrite_checks_everything_before_touching_the_old_run(data_dir, finished_run,
                                                                 tmp_path, capsys, monkeypatch):
    """Item 2: a bad --data or --lr 0 with --overwrite used to delete the run, then fail."""
    run = copy_run(finished_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    for bad in (["--data", tmp_path / "typo"], ["--lr", 0, "--min-lr", 0]):
        got = cli_train(*tiny_flags(data_dir, run, "--overwrite"), *bad)
        one_line_error(capsys, 2, got, str(bad[1]) if bad[0] == "--data" else "--lr")
        assert snapshot(run) == before
    real_lr_at = train.lr_at                        # a failure after the start, before step 4

    def crash(step, *args):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return real_lr_at(step, *args)
    monkeypatch.setattr(train, "lr_at", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny(data_dir, run, max_steps=4, seed=7), model.PRESETS["tiny"], overwrite=True)
    assert snapshot(run) == before                  # the old run is back, whole
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    train.train(tiny(data_dir, run, max_steps=4, seed=7), model.PRESETS["tiny"], overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000004", "loss.png", "metrics.jsonl",
                                                     "notes.txt"]
    assert (run / "notes.txt").read_text() == "mine"
    new, old = weights(run), weights(finished_run)
    assert any(not torch.equal(new[k], old[k]) for k in new)     # seed 7: a different run


def test_a_resumed_copy_trains_the_folder_named(data_dir, finished_run, tmp_path, capsys):
    """Item 3: `cp -r a b; train --out b --resume` must write b/, not the a/ in config.json."""
    a = copy_run(finished_run, tmp_path / "a")
    b = copy_run(a, tmp_path / "b")
    before = snapshot(a)
    assert cli_train("--out", b, "--resume", "--max-steps", 8) == 0
    assert snapshot(a) == before
    assert train.find_checkpoint(b).name == "ckpt-0000008"
    saved = json.loads((train.find_checkpoint(b) / "config.json").read_text())
    assert saved["train"]["out"] == str(b)


@pytest.mark.parametrize("flags, message", [
    (["--grad-clip", "-1"], "--grad-clip must be in [0, inf), got -1.0"),
    (["--weight-decay", "-1"], "--weight-decay must be in [0, inf), got -1.0"),
    (["--lr", "0", "--min-lr", "0"], "--lr must be in (0, inf), got 0.0"),
    (["--lr", "nan"], "--lr must be in (0, inf), got nan"),
    (["--lr", "inf"], "--lr must be in (0, inf), got inf"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr must be at most --lr=0.01, got 0.1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be in [0, inf), got -1"),
    (["--warmup-steps", "4"], "--warmup-steps must be below --max-steps=4, got 4"),
    (["--max-steps", "0"], "--max-steps must be in [1, inf), got 0"),
    (["--batch-size", "16", "--micro-batch", "3"], "--batch-size 16 is not a multiple of"),
    (["--micro-batch", "0"], "--micro-batch must be in [1, inf), got 0"),
    (["--sample-tokens", "-5"], "--sample-tokens must be in [0, inf), got -5"),
    (["--dropout", "1"], "dropout must be in [0, 1), got 1.0"),
    (["--dropout", "nan"], "dropout must be in [0, 1), got nan")])
def test_every_numeric_flag_is_range_checked(data_dir, tmp_path, capsys, flags, message):
    """Item 4: --grad-clip -1 used to train by gradient ascent and exit 0."""
    got = cli_train(*tiny_flags(data_dir, tmp_path / "run"), *flags)
    one_line_error(capsys, 2, got, message)
    assert not (tmp_path / "run").exists()


def test_a_huge_block_size_fails_at_once(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "device_memory", lambda device: 64 * 2**30)
    got = cli_train("--preset", "cpu", "--data", data_dir, "--out", tmp_path / "run",
                    "--block-size", 100_000)
    one_line_error(capsys, 2, got, "--block-size 100000 with --micro-batch 16 needs about",
                   "more than the 64 GiB")
    got = cli_train(*tiny_flags(data_dir, tmp_path / "run", "--block-size", 20_000))
    one_line_error(capsys, 2, got, "too few for --block-size 20000")   # the corpus is shorter
    assert not (tmp_path / "run").exists()


def test_resume_refuses_other_data(data_dir, finished_run, tmp_path, capsys):
    """Item 5: another corpus of the same vocabulary size used to be trained on silently."""
    other = tmp_path / "other"
    data.prepare(other, [("x", TEXT[::-1])], source="reversed", vocab_size=320, progress=False)
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    got = cli_train("--out", run, "--resume", "--max-steps", 8, "--data", other)
    one_line_error(capsys, 2, got, f"was trained on {data_dir}", f"--data {other} has a "
                   "different tokenizer")
    assert snapshot(run) == before
    moved = copy_run(data_dir, tmp_path / "moved")  # the same data elsewhere is the same data
    assert cli_train("--out", run, "--resume", "--max-steps", 8, "--data", moved) == 0


def test_resume_to_a_step_already_reached_says_so(finished_run, tmp_path, capsys):
    """Item 6: --max-steps below the run's step used to print "trained to step 2"."""
    run = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run)
    got = cli_train("--out", run, "--resume", "--max-steps", 2)       # below the warmup too
    one_line_error(capsys, 2, got, "is already at step 4, past --max-steps 2: nothing was trained")
    assert cli_train("--out", run, "--resume") == 0           # at its --max-steps: nothing to do
    assert "is already at step 4 = --max-steps: nothing to train" in capsys.readouterr().out
    assert snapshot(run) == before


def test_damaged_runs_are_one_line_errors(data_dir, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    got = cli_train(*tiny_flags(data_dir, run))
    one_line_error(capsys, 2, got, "already holds a run; pass --resume")
    ckpt = train.find_checkpoint(run)
    for name in ("trainer.pt", "model.safetensors"):
        broken = copy_run(run, tmp_path / name)
        (broken / ckpt.name / name).write_bytes(b"\x00garbage" * 10)
        got = cli_train("--out", broken, "--resume", "--max-steps", 8)
        one_line_error(capsys, 2, got, f"{name} is unreadable")
    (run / "metrics.jsonl").open("a").write('{"step": 5, "lo')     # torn by a kill
    assert cli_train("--out", run, "--resume", "--max-steps", 8) == 0
    capsys.readouterr()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 8
    got = cli_train(*tiny_flags(tmp_path / "nowhere", tmp_path / "new"))
    one_line_error(capsys, 2, got, f"--data {tmp_path / 'nowhere'}: no prepared data there")
    (tmp_path / "file").write_text("x")
    got = cli_train(*tiny_flags(data_dir, tmp_path / "file" / "run"))
    one_line_error(capsys, 2, got, "is not a folder we can write in")


def test_a_full_disk_keeps_the_last_checkpoint(data_dir, finished_run, tmp_path, capsys,
                                               monkeypatch):
    import errno
    run = copy_run(finished_run, tmp_path / "run")
    real_save = torch.save

    def full_disk(obj, f, *args, **kw):
        f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    got = cli_train("--out", run, "--resume", "--max-steps", 8)
    one_line_error(capsys, 1, got, "could not save", "No space left on device",
                   "kept " + str(run / "ckpt-0000004"))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-0000004", "loss.png", "metrics.jsonl"]
    train.load_checkpoint(run)
    assert cli_train("--out", run, "--resume", "--max-steps", 8) == 0


def test_a_run_killed_before_its_first_checkpoint_starts_again(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(train, "lr_at", lambda step, *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny(data_dir, run, max_steps=4), model.PRESETS["tiny"])
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]   # no checkpoint: no run
    monkeypatch.undo()
    train.train(tiny(data_dir, run, max_steps=4), model.PRESETS["tiny"])  # no --overwrite needed
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 4]                    # one run's log, not two


def test_float16_loss_scale_has_a_floor(data_dir, tmp_path, monkeypatch):
    real = train.accumulate_gradients

    def overflowing(model, *args):                  # every step's gradients hold an inf
        loss = real(model, *args)
        next(model.parameters()).grad[0] = math.inf
        return loss
    monkeypatch.setattr(train, "accumulate_gradients", overflowing)
    cfg = tiny(data_dir, tmp_path / "run", dtype="float16", max_steps=40, eval_every=40)
    with pytest.raises(FloatingPointError, match=r"loss scale fell below 1 at step 17 \(17 steps"):
        train.train(cfg, model.PRESETS["tiny"])


# --- issue 18: a wall-clock budget; Adam's betas from the command line ------------------------

def test_schedule_end_follows_the_clock():
    cfg = train.TrainConfig(max_steps=1000, warmup_steps=10, max_seconds=60.0)
    assert train.schedule_end(cfg, 5, 3.0) == 1000        # in warmup: the planned length
    assert train.schedule_end(cfg, 100, 10.0) == 600      # 10 steps/s for 60 s
    assert train.schedule_end(cfg, 100, 1.0) == 1000      # faster than planned: the cap
    assert train.schedule_end(dataclasses.replace(cfg, max_seconds=0.0), 100, 10.0) == 1000


def test_max_seconds_stops_the_run_and_saves(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    got = cli_train("--preset", "tiny", "--data", data_dir, "--out", run, "--max-steps", 100_000,
                    "--warmup-steps", 2, "--eval-every", 100_000, "--eval-batches", 1,
                    "--sample-tokens", 0, "--max-seconds", 1.5)
    assert got == 0, capsys.readouterr().err
    ckpt = train.find_checkpoint(run)
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert 1.5 <= state["seconds"] < 10 and 1 <= state["step"] < 100_000
    assert ckpt.name == f"ckpt-{state['step']:07d}"          # saved where the clock stopped it
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == state["step"] and "val_loss" in records[-1]
    assert f"trained to step {state['step']} in" in capsys.readouterr().out


def test_betas_are_flags_recorded_and_kept_on_resume(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli_train(*tiny_flags(data_dir, run, "--beta1", 0.8, "--beta2", 0.9)) == 0
    saved = json.loads((train.find_checkpoint(run) / "config.json").read_text())
    assert (saved["train"]["beta1"], saved["train"]["beta2"]) == (0.8, 0.9)
    assert cli_train("--out", run, "--resume", "--max-steps", 6, "--beta2", 0.99) == 0
    saved = json.loads((train.find_checkpoint(run) / "config.json").read_text())
    assert (saved["train"]["beta1"], saved["train"]["beta2"]) == (0.8, 0.99)
    state = torch.load(train.find_checkpoint(run) / "trainer.pt", weights_only=True)
    assert {tuple(g["betas"]) for g in state["optimizer"]["param_groups"]} == {(0.8, 0.99)}
    for bad, message in ((["--beta2", 1], "--beta2 must be in [0, 1), got 1.0"),
                         (["--beta1", -0.1], "--beta1 must be in [0, 1), got -0.1")):
        one_line_error(capsys, 2, cli_train(*tiny_flags(data_dir, tmp_path / "x", *bad)),
                       message)


def test_resume_accepts_the_models_own_flags(finished_run, tmp_path, capsys):
    """make train passes --pos rope; make train ARGS=--resume passes it again."""
    run = copy_run(finished_run, tmp_path / "run")
    one_line_error(capsys, 2, cli_train("--out", run, "--resume", "--max-steps", 6,
                                        "--pos", "rope"), "a resumed run keeps its model")
    assert cli_train("--out", run, "--resume", "--max-steps", 6, "--pos", "learned") == 0
    assert train.find_checkpoint(run).name == "ckpt-0000006"
