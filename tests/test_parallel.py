"""More machines: our all-reduce equals DDP's, FSDP2 works on Gloo, a skipped collective fails.

Each test starts two fresh processes (Gloo, on the CPU) through parallel.launch, which
ends them after timeout_s if the code under test hangs."""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from llm import data, model, parallel, train

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "llm.org").read_text(encoding="utf-8")[:40_000]   # a small corpus at hand


def test_buckets_follow_backward_order_and_respect_the_cap():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 300, 20, 30, 40)]   # float32
    buckets = parallel.make_buckets(params, cap_bytes=280)
    sizes = [[p.numel() for p in b] for b in buckets]
    assert sizes == [[40, 30], [20], [300], [10]]      # reversed; 300 floats alone, over the cap
    assert parallel.make_buckets(params, cap_bytes=10**6) == [params[::-1]]


def test_hand_written_all_reduce_equals_ddp():
    got = parallel.launch(parallel.gradients_four_ways, 0.05)
    for rank in range(2):
        g = got[rank]["grads"]
        assert got[rank]["buckets"] == 3                # 139 kB of gradients in 50 kB buckets
        for micro in (4, 2):                              # 2: accumulated, through no_sync
            for how in ("per tensor", "buckets"):         # bit for bit, every tensor
                assert len(g[f"{how} {micro}"]) == len(g[f"DDP {micro}"]) == 28
                assert all(torch.equal(a, b) for a, b in zip(g[f"{how} {micro}"],
                                                             g[f"DDP {micro}"])), how
            for a, b in zip(g[f"DDP {micro}"], g["whole batch 4"]):   # = one process
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got[0]["grads"]["buckets 2"],
                                                 got[1]["grads"]["buckets 2"]))


def test_train_with_our_all_reduce_equals_accumulation(tmp_path):
    """`--ddp ours` in two processes = one process with two micro-batches, bit for bit."""
    data.prepare(tmp_path / "data", [("llm.org", TEXT)], source="llm.org", tokenizer="bpe",
                 vocab_size=320, progress=False)
    flags = dict(batch_size=8, micro_batch=4, max_steps=4, warmup_steps=2, eval_every=4,
                 eval_batches=1, sample_tokens=0, log_every=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = {**train.TRAIN_PRESETS["tiny"], **flags}     # what `--preset tiny` gives
        train.train(train.TrainConfig(preset="tiny", data=str(tmp_path / "data"),
                                      out=str(tmp_path / "one"), **settings),
                    model.PRESETS["tiny"])
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llm", "train", "--preset=tiny", f"--data={tmp_path / 'data'}",
           f"--out={tmp_path / 'two'}", "--ddp=ours",
           *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items())]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "build"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_file(str(train.find_checkpoint(tmp_path / run) / "model.safetensors"))
            for run in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_on_gloo_equals_one_process():
    got = parallel.launch(parallel.fsdp_step)
    assert got[0]["held"] + got[1]["held"] == got[0]["params"] == 34_688   # each holds half
    assert max(g["diff"] for g in got) < 1e-5


def test_a_skipped_collective_fails_at_the_timeout():
    message = parallel.launch(parallel.skip_a_collective, group_timeout_s=2)[0]
    assert "Timed out" in message or "timeout" in message.lower(), message
