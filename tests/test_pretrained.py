"""Part V, Pretrained weights: the Hugging Face layout in and out, against transformers."""
import dataclasses
import hashlib
import http.server
import json
import os
import shutil
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
        assert expected.std() > 0.5             # the large weights give large logits
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


# --- export -----------------------------------------------------------------------------------

def our_model(**changes) -> GPT:
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layers=2, n_heads=4, d_model=32,
                          **changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.ndim == 2 else 10))
    return model


EXPORTS = {
    "gpt2-shaped": dict(mlp="gelu_tanh"),
    "cpu-preset-shaped (no biases, exact gelu)": dict(mlp="gelu", bias=False),
    "llama-shaped gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                             tie_weights=False, n_kv_heads=2, rope_theta=500.0),
    "llama-shaped tied": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_export_loads_in_transformers_with_equal_logits(tmp_path, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = our_model(**EXPORTS[case]), small_tokenizer()
    P.export_pretrained(model, tok, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_logit_diff(model, hf) < 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(TEXT)["input_ids"] == tok.encode(TEXT)
    back, back_tok, _ = load_checkpoint(tmp_path / "out")     # and the round trip
    assert max_logit_diff(back, hf) < 1e-4
    assert back_tok.to_dict() == tok.to_dict()
    with pytest.raises(CheckpointError, match="exists"):
        P.export_pretrained(model, tok, tmp_path / "out")


def test_export_refuses_a_model_transformers_cannot_run(tmp_path):
    with pytest.raises(CheckpointError, match="neither GPT-2- nor Llama-shaped"):
        P.export_pretrained(our_model(pos="rope"), small_tokenizer(), tmp_path / "out")
    assert not any(tmp_path.iterdir())


# --- tokenizers -------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_exported_tokenizer_json_equals_ours_in_tokenizers(tmp_path, pattern):
    from tokenizers import Tokenizer
    tok = small_tokenizer(pattern, 400)
    files = P.hf_tokenizer_files(tok)
    (tmp_path / "tokenizer.json").write_text(files["tokenizer.json"], encoding="utf-8")
    theirs = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = TEXT * 3 + "abcabd abe's 12345"
    assert theirs.encode(text).ids == tok.encode(text)
    assert P.load_hf_tokenizer(tmp_path).to_dict() == tok.to_dict()


@pytest.fixture(scope="module")
def gpt2_tiktoken(tmp_path_factory):
    if not SHARED_GPT2.is_dir():
        pytest.skip("GPT-2's tokenizer files are not in ../shared/data/gpt2")
    import tiktoken
    cache = tmp_path_factory.mktemp("tiktoken")
    shutil.copy(SHARED_GPT2 / "vocab.json", cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")
    shutil.copy(SHARED_GPT2 / "merges.txt", cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        yield tiktoken.get_encoding("gpt2")
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR") if old is None else os.environ.update(
            TIKTOKEN_CACHE_DIR=old)


def test_gpt2_tokenizer_files_equal_tiktoken(tmp_path, gpt2_tiktoken):
    """vocab.json + merges.txt, and the tokenizer.json we write from them, give tiktoken's ids."""
    from tokenizers import Tokenizer
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(SHARED_GPT2 / name, tmp_path / name)
    tok = P.load_hf_tokenizer(tmp_path)
    text = TEXT * 5 + Path(P.__file__).read_text()[:20000]
    assert tok.encode(text) == gpt2_tiktoken.encode_ordinary(text)
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    files = P.hf_tokenizer_files(tok)
    assert files["merges.txt"] == (SHARED_GPT2 / "merges.txt").read_text(encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text(files["tokenizer.json"], encoding="utf-8")
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == tok.encode(text)
    assert P.load_hf_tokenizer(tmp_path).to_dict() == tok.to_dict()    # read back from json


def test_sentencepiece_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"normalizer": {"type": "Replace"}, "pre_tokenizer": None,
         "model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}}))
    with pytest.raises(CheckpointError, match="not a byte-level BPE"):
        P.load_hf_tokenizer(tmp_path)


# --- the RoPE layouts -------------------------------------------------------------------------

def test_interleaved_rope_weights_permuted_give_our_scores():
    """Meta's pairs (x_2i, x_2i+1) with W equal our split halves with the rows of W permuted."""
    torch.manual_seed(0)
    n_heads, head_dim, d, T = 2, 8, 16, 6
    wq, wk, x = torch.randn(d, d), torch.randn(d, d), torch.randn(T, d)
    theta = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angle = torch.outer(torch.arange(T).float(), theta)                       # (T, head_dim/2)

    def interleaved(w):          # Meta's llama/model.py: pairs as complex numbers
        z = torch.view_as_complex((x @ w.T).view(T, n_heads, head_dim // 2, 2))
        return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)[:, None])

    def halves(w):               # ours: rotate_half with cos/sin tables
        from llm.model import rope_tables, rotate_half
        cos, sin = rope_tables(head_dim, T, 10000.0)
        y = (x @ w.T).view(T, n_heads, head_dim)
        return y * cos[:, None] + rotate_half(y) * sin[:, None]

    def scores(q, k):
        return torch.einsum("thd,shd->hts", q.reshape(T, n_heads, -1), k.reshape(T, n_heads, -1))

    theirs = scores(interleaved(wq), interleaved(wk))
    ours = scores(halves(P.interleaved_to_halves(wq, n_heads)),
                  halves(P.interleaved_to_halves(wk, n_heads)))
    assert (ours - theirs).abs().max() < 1e-4
    assert (scores(halves(wq), halves(wk)) - theirs).abs().max() > 1.0   # without: wrong


# --- download, from a local server ------------------------------------------------------------

class Hub(http.server.BaseHTTPRequestHandler):
    """A few lines of the hub: the file list with sizes and hashes, and files with Range."""
    files: dict[str, bytes] = {}
    ranges: list[str] = []

    def do_GET(self):
        if self.path.startswith("/api/models/"):
            siblings = []
            for name, data in self.files.items():
                s = {"rfilename": name, "size": len(data),
                     "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                if name.endswith(".safetensors"):
                    s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                siblings.append(s)
            return self.reply(200, json.dumps({"siblings": siblings}).encode())
        name = self.path.split("/resolve/main/")[-1]
        if name not in self.files:
            return self.reply(404, b"")
        data, start = self.files[name], 0
        if "Range" in self.headers:
            self.ranges.append(f"{name} {self.headers['Range']}")
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        self.reply(206 if start else 200, data[start:])

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    hf = gpt2_folder(repo)
    Hub.files = {p.name: p.read_bytes() for p in repo.iterdir()}
    Hub.ranges = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield hf
    server.shutdown()


def test_download_resumes_checks_and_loads(tmp_path, hub, monkeypatch):
    out = tmp_path / "models" / "tiny"
    part = out.with_name(".tiny.download")                # an interrupted earlier attempt
    part.mkdir(parents=True)
    (part / "model.safetensors").write_bytes(Hub.files["model.safetensors"][:1000])
    args = type("Args", (), {"name": "me/tiny", "out": str(out), "revision": "main"})
    assert P.download_main(args) == 0
    assert Hub.ranges == ["model.safetensors bytes=1000-"]
    assert not part.exists()
    assert max_logit_diff(load_checkpoint(out)[0], hub) < 1e-4
    assert P.download_main(args) == 0                        # again: already there


def test_download_deletes_a_corrupt_file_and_says_so(tmp_path, hub, capsys):
    out = tmp_path / "m"
    good = Hub.files["config.json"]
    Hub.files["config.json"] = good.replace(b"gpt2", b"gpT2")     # what the list promised: good
    Hub.files, listed = dict(Hub.files), None
    args = type("Args", (), {"name": "me/m", "out": str(out), "revision": "main"})
    original = Hub.do_GET

    def lie(self):                 # the list describes good bytes, the file is corrupt
        if self.path.startswith("/api/"):
            Hub.files["config.json"] = good
            original(self)
            Hub.files["config.json"] = good.replace(b"gpt2", b"gpT2")
        else:
            original(self)
    Hub.do_GET = lie
    try:
        assert P.download_main(args) == 1
    finally:
        Hub.do_GET = original
    assert "config.json does not match the hub's size and hash" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / ".m.download" / "config.json").exists()


def test_download_without_network_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")       # nothing listens there
    args = type("Args", (), {"name": "gpt2", "out": str(tmp_path / "g"), "revision": "main"})
    assert P.download_main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach http://127.0.0.1:9" in err
    assert "openai-community/gpt2/tree/main: config.json, model.safetensors" in err
    assert not (tmp_path / "g").exists()


# --- the commands -----------------------------------------------------------------------------

def test_generate_and_export_commands_take_a_hugging_face_folder(tmp_path, capsys):
    from llm.__main__ import main
    gpt2_folder(tmp_path / "hf")
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "abc",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("abc")
    assert main(["export", "--checkpoint", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "hf")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "hf"), "--out",
                 str(tmp_path / "x")]) == 0
    a, b = load_checkpoint(tmp_path / "hf")[0], load_checkpoint(tmp_path / "x")[0]
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_train_init_from_starts_from_the_weights_and_checks_the_tokenizer(tmp_path, capsys):
    from llm import data
    from llm.__main__ import main
    from llm.tokenizer import load_tokenizer
    gpt2_folder(tmp_path / "hf")
    (tmp_path / "book.txt").write_text(TEXT * 40, encoding="utf-8")
    assert main(["prepare", "--text", str(tmp_path / "book.txt"), "--tokenizer-from",
                 str(tmp_path / "hf"), "--out", str(tmp_path / "data")]) == 0
    assert load_tokenizer(tmp_path / "data").to_dict() == small_tokenizer().to_dict()
    data.prepare(tmp_path / "other", [("text", TEXT * 40)], source="test", vocab_size=300,
                 progress=False)                    # a tokenizer of its own: not the model's
    run = ["train", "--preset", "tiny", "--max-steps", "1", "--warmup-steps", "0",
           "--lr", "1e-9", "--min-lr", "1e-9", "--eval-every", "1", "--eval-batches", "1",
           "--sample-tokens", "0", "--batch-size", "2", "--micro-batch", "2",
           "--init-from", str(tmp_path / "hf"), "--out", str(tmp_path / "r")]
    assert main(run + ["--data", str(tmp_path / "other")]) == 2
    assert "prepare it with `python -m llm prepare --tokenizer-from" in capsys.readouterr().err
    assert main(run + ["--data", str(tmp_path / "data"), "--n-layers", "3"]) == 2
    assert "drop --n-layers" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(run + ["--data", str(tmp_path / "data")]) == 0
    source, trained = load_checkpoint(tmp_path / "hf")[0], load_checkpoint(tmp_path / "r")[0]
    assert trained.config == dataclasses.replace(source.config, attention=trained.config.attention)
    for name, tensor in source.state_dict().items():     # a step of 1e-9 changes nothing
        assert (trained.state_dict()[name] - tensor).abs().max() < 1e-6, name
