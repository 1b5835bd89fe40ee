"""Part V, Pretrained weights: the Hugging Face layout in and out, against transformers."""
import dataclasses
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm import pretrained as P
from llm.model import GPT, GPTConfig
from llm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer
from llm.train import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED_GPT2 = ROOT.parent / "shared" / "data" / "gpt2"
TEXT = ("It was the best of times, it was the worst of times; 1234 apples cost $5.67!\n"
        "  Ce qu'il a dit: «naïve café» — 東京 🙂\n\nThe end.   ")


def scale_up(hf_model, seed: int) -> None:
    """Weights N(0, 1/fan_in) and norm gains 1 + 0.1 N(0, 1): large enough to show any mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            else:    # Conv1D stores (in, out), nn.Linear (out, in); embeddings: unit scale
                fan_in = p.shape[0] if "c_attn" in name or ".c_" in name else p.shape[1]
                p.copy_(noise / (fan_in ** 0.5 if "wte" not in name and "wpe" not in name
                                 and "embed" not in name else 1.0))


def small_tokenizer(pattern=GPT2_PATTERN, vocab_size=300) -> BPETokenizer:
    return BPETokenizer.train(TEXT * 20 + "abc abd abe " * 50, vocab_size, pattern)


def gpt2_folder(tmp: Path, tie=True, act="gelu_new", seed=1, vocab=300, **changes):
    """A transformers GPT-2 saved with save_pretrained, with our tokenizer files beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = dict(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4,
               activation_function=act, layer_norm_epsilon=1e-5, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie, bos_token_id=None,
               eos_token_id=None, **changes)
    hf = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    scale_up(hf, seed)
    hf.save_pretrained(tmp)
    for name, text in P.hf_tokenizer_files(small_tokenizer(vocab_size=vocab)).items():
        (tmp / name).write_text(text, encoding="utf-8")
    return hf


def llama_folder(tmp: Path, kv_heads=2, tie=False, seed=2, vocab=300, shard=None, **changes):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        **changes)).eval()
    scale_up(hf, seed)
    hf.save_pretrained(tmp, **({"max_shard_size": shard} if shard else {}))
    for name, text in P.hf_tokenizer_files(small_tokenizer(GPT4_PATTERN, vocab)).items():
        (tmp / name).write_text(text, encoding="utf-8")
    return hf


def max_logit_diff(ours: GPT, hf, vocab=300) -> float:
    idx = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        assert expected.std() > 1.0             # the large weights give large logits
        return (ours(idx)[0] - expected).abs().max().item()


CASES = {
    "gpt2-tied": lambda d: gpt2_folder(d),
    "gpt2-untied-exact-gelu": lambda d: gpt2_folder(d, tie=False, act="gelu"),
    "llama-gqa-untied": lambda d: llama_folder(d),
    "llama-mha-tied": lambda d: llama_folder(d, kv_heads=4, tie=True),
    "llama-gqa-sharded": lambda d: llama_folder(d, shard="20KB"),
}


@pytest.mark.parametrize("case", CASES)
def test_import_equals_transformers(tmp_path, case):
    hf = CASES[case](tmp_path)
    model, tokenizer, config = load_checkpoint(tmp_path)    # the loader every command uses
    assert max_logit_diff(model, hf) < 1e-4
    if config.tie_weights:
        assert model.lm_head.weight is model.tok_emb.weight
    if case.endswith("sharded"):
        assert (tmp_path / "model.safetensors.index.json").is_file()
    assert tokenizer.encode(TEXT) == small_tokenizer(
        GPT2_PATTERN if case.startswith("gpt2") else GPT4_PATTERN).encode(TEXT)


def test_bf16_weights_load_into_the_dtype_asked_for(tmp_path):
    hf = gpt2_folder(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in sd.items()}, tmp_path / "model.safetensors")
    model, _, _ = P.load_pretrained(tmp_path, dtype=torch.float32)
    assert model.tok_emb.weight.dtype == torch.float32
    model16, _, _ = P.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model16.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(model16.tok_emb.weight.float(), model.tok_emb.weight)
    assert 0 < max_logit_diff(model, hf) < 0.5        # bfloat16 rounding, not a layout error


def test_old_gpt2_names_without_prefix_and_mask_buffers_load(tmp_path):
    hf = gpt2_folder(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))   # GPT-2's stored causal mask
    save_file(old, tmp_path / "model.safetensors")
    assert max_logit_diff(P.load_pretrained(tmp_path)[0], hf) < 1e-4


def test_missing_or_mismatched_tensor_is_named(tmp_path):
    gpt2_folder(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks the tensor transformer\.h\.1\.mlp\.c_fc"
                                              r"\.weight \(our blocks\.1\.mlp\.up_proj\.weight\)"):
        load_checkpoint(tmp_path)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"].t().contiguous()
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight has shape "
                                              r"\(32, 128\), our blocks\.1\.mlp\.up_proj\.weight"
                                              r" needs \(128, 32\)"):
        load_checkpoint(tmp_path)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"].t().contiguous()
    sd["transformer.h.0.attn.q_norm.weight"] = torch.ones(8)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no place for: transformer\.h\.0\.attn\.q_norm"):
        load_checkpoint(tmp_path)


def test_unsupported_settings_are_refused_by_name(tmp_path):
    llama_folder(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_type 'llama3'"):
        load_checkpoint(tmp_path)
    cfg["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not one we read"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("case", ["gpt2-tied", "llama-gqa-untied"])
def test_greedy_generation_equals_transformers_generate(tmp_path, case):
    from llm.generate import Decoder
    hf = CASES[case](tmp_path)
    model = load_checkpoint(tmp_path)[0]
    prompt = [5, 17, 200, 42]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    decoder, ids = Decoder(model, use_cache=True), []
    logits = decoder.feed(prompt)
    for _ in range(20):
        ids.append(int(logits.argmax()))
        logits = decoder.feed([ids[-1]])
    assert ids == expected
