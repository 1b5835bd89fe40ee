"""The Speed chapter: FLOPs counted against the formula, the profile, memory, page faults, the command."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from llm import bench
from llm.__main__ import main
from llm.model import GPT, PRESETS, flops_per_token


@pytest.mark.parametrize("name", list(PRESETS))
def test_flops_formula_equals_counted_flops_for_every_preset(name):
    # On the meta device nothing is computed, so even the 152M-parameter models cost nothing,
    # and the fused attention decomposes into the two batched products the counter sees.
    for attention in ("explicit", "sdpa"):
        config = dataclasses.replace(PRESETS[name], attention=attention)
        with torch.device("meta"):
            model = GPT(config)
        for B, T in ((2, 16), (1, config.block_size)):
            idx = torch.randint(0, config.vocab_size, (B, T), device="meta")
            with FlopCounterMode(display=False) as counter:
                model(idx, idx)[1].backward()
            assert counter.get_total_flops() == B * T * flops_per_token(config, T), (attention, T)


def test_train_step_flops_and_settings():
    step = bench.TrainStep("tiny", 4, torch.device("cpu"))
    config = PRESETS["tiny"]
    assert step.tokens_per_step == 4 * config.block_size
    assert step.flops == 4 * config.block_size * flops_per_token(config)
    with pytest.raises(ValueError, match="unknown settings.*'dropout'"):
        bench.TrainStep("tiny", 4, torch.device("cpu"), dropout=0.1)
    with pytest.raises(ValueError, match="optimizer must be"):
        bench.make_adamw(step.model, "lion")


def test_percentiles_and_ratio():
    assert bench.percentiles([3.0, 1.0, 2.0]) == {"median": 2.0, "p90": 3.0}
    times = [float(i) for i in range(1, 11)]
    assert bench.percentiles(times) == {"median": 5.5, "p90": 9.0}
    assert bench.ratio([2.0, 6.0], [1.0, 2.0]) == {"median": 2.5, "p90": 3.0}
    with pytest.raises(ValueError):
        bench.percentiles([])


def test_profile_piles_add_up_to_the_step():
    step = bench.TrainStep("tiny", 4, torch.device("cpu"))
    step()
    seconds = bench.profile_step(step)
    assert math.isclose(sum(seconds[c] for c in bench.CATEGORIES), seconds["total"])
    assert all(seconds[c] >= 0 for c in bench.CATEGORIES)
    assert seconds["matmul"] > 0 and seconds["attention"] > 0 and seconds["optimizer"] > 0
    assert bench.category("aten::addmm") == "matmul"
    assert bench.category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert bench.category("aten::native_layer_norm") == "other ops"


def test_peak_memory_counts_weights_and_activations():
    device = torch.device("cpu")
    plain = bench.TrainStep("tiny", 16, device)
    ckpt = bench.TrainStep("tiny", 16, device, activation_checkpointing=True)
    for s in (plain, ckpt):
        s()                                 # the optimizer's state exists from the first step
    weights = sum(p.nbytes for p in plain.model.parameters())
    # weights, gradients and AdamW's two averages: at least 4 copies of the weights
    assert bench.peak_memory(plain) > 4 * weights
    # checkpointing keeps a block's input instead of its 16 d_model internals per token
    assert bench.peak_memory(ckpt) < bench.peak_memory(plain)


FAULTS = """
import platform, sys, torch
from llm.bench import page_faults
from llm.train import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else platform.libc_ver()[0] == "glibc")
n, faults = 64 << 20, []                # a 64 MiB block, as large as the cpu model's logits
for _ in range(12):
    before = page_faults()
    torch.empty(n, dtype=torch.uint8).fill_(1)
    faults.append(page_faults() - before)
print(sum(faults[-3:]))                 # the heap has settled after a few rounds
"""


def test_keeping_freed_memory_stops_page_faults():
    # in fresh processes: how glibc behaves depends on everything allocated before, and
    # "glibc" is its own settings, which return a 64 MiB block to the kernel when it is freed
    faults = {}
    for mode in ("keep", "glibc"):
        run = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "build")})
        glibc, faults[mode] = run.stdout.split()
        if glibc != "True":
            pytest.skip("not glibc")
        faults[mode] = int(faults[mode])
    pages = 3 * (64 << 20) // 4096
    assert faults["keep"] < 100 and faults["glibc"] >= pages, faults


def test_bench_runs_end_to_end_and_writes_json(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    threads = torch.get_num_threads()
    try:                                    # one thread: tiny tensors are faster without a second
        assert main(["bench", "model", "--presets", "tiny", "--switch-preset", "tiny", "--rounds", "1",
                     "--threads", "1", "--peak-sizes", "64", "--json", str(out), "--plot", str(png)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    assert results["machine"]["threads"] == 1
    assert set(results["peak"]) == {"float32", "bfloat16"}
    tiny = results["presets"]["tiny"]
    assert tiny["tokens_per_step"] == 16 * PRESETS["tiny"].block_size
    assert tiny["flops_per_step"] == tiny["tokens_per_step"] * flops_per_token(PRESETS["tiny"])
    assert set(tiny["threads"]) == {"1"}
    for row in tiny["threads"].values():
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["mfu_p90"] <= row["mfu"]
    assert tiny["peak_memory_mib"] > 0
    assert set(results["profile"]) == {"glibc", "keep"}
    expected = {"default"} | {n for n, c in bench.SWITCHES.items() if not c.get("compile")}
    assert set(results["switches"]) == expected
    assert results["switches"]["default"]["ratio"] == {"median": 1.0, "p90": 1.0}
    assert results["switches"]["bfloat16 autocast"]["settings"] == {"dtype": "bfloat16"}
    assert png.stat().st_size > 10_000


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        main(["bench", "model", "--presets", "gpt3", "--peak-sizes", "64",
              "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "--rounds must be in [1, inf), got 0"),
    (["--batch", "-2"], "--batch must be in [1, inf), got -2"),
    (["--threads", "0"], "--threads must be in [1, inf), got 0"),
    (["--peak-sizes", "64", "0"], "--peak-sizes must be in [1, inf), got 0")])
def test_numeric_flags_are_range_checked_before_measuring(tmp_path, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        main(["bench", "model", *flags, "--json", str(tmp_path / "b.json"),
              "--plot", str(tmp_path / "b.png")])
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_bench_gpu_says_why_it_skipped(capsys):
    assert main(["bench", "gpu"]) == 0
    assert "GPU paths skipped: torch.cuda.is_available() is False" in capsys.readouterr().out


def test_peak_is_the_best_of_every_size():
    import argparse
    args = argparse.Namespace(peak_sizes=[16, 32], rounds=1)
    results, batches = bench.measure_peaks(args, torch.device("cpu"))
    sizes = [b.n for b in batches["float32 every size"]]
    assert sizes == [16, 32] and batches["float32"].n == results["float32"]["size"] in sizes
