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

pytest.importorskip("llm.model")
pytest.importorskip("llm.data")
from llm import data, model, optim, train  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "llm.org").read_text(encoding="utf-8")[:40_000]   # a small corpus at hand


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small are bound by per-operation overhead, which a second thread does not
    help, and on a shared machine a busy second core makes a 2-thread step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
