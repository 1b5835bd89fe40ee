"""Part II: every component of the model against PyTorch's reference or transformers' models."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from llm import model as M


def small(**changes) -> M.GPTConfig:
    """A few-thousand-parameter config, changed as asked."""
    base = M.GPTConfig(vocab_size=97, block_size=24, n_layers=2, n_heads=4, d_model=32,
                       mlp="gelu", fused_ops=False)
    return dataclasses.replace(base, **changes)


GPT2_LIKE = dict(norm="layernorm", mlp="gelu_tanh", pos="learned", bias=True, tie_weights=True)
LLAMA_LIKE = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_weights=False,
                  n_kv_heads=2, d_ff=80)


# --- the written-out pieces equal PyTorch's -------------------------------------------------

def max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest difference, relative to the reference where it is larger than 1.

    A 32-bit float near 50 is only stored to 4e-6, so "within 1e-6" means 1e-6 of the size.
    """
    return ((ours - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


def test_layernorm_equals_torch():
    torch.manual_seed(0)
    x = 3 * torch.randn(4, 7, 48) + 1.5
    for bias in (True, False):
        ours = M.LayerNorm(48, eps=1e-5, bias=bias)
        with torch.no_grad():
            ours.weight.normal_(1.0, 0.2)
            if bias:
                ours.bias.normal_(0.0, 0.2)
        ref = F.layer_norm(x, (48,), ours.weight, ours.bias, 1e-5)
        assert (ours(x) - ref).abs().max() < 1e-6
        ours.fused = True
        assert (ours(x) - ref).abs().max() < 1e-6


def test_rmsnorm_equals_torch():
    torch.manual_seed(0)
    x = 3 * torch.randn(4, 7, 48) + 1.5
    ours, ref = M.RMSNorm(48, eps=1e-6), nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(1.0, 0.2)
        ref.weight.copy_(ours.weight)
    assert (ours(x) - ref(x)).abs().max() < 1e-6
    ours.fused = True
    assert (ours(x) - ref(x)).abs().max() < 1e-6


def test_activations_equal_torch():
    x = torch.linspace(-8, 8, 10001)
    # against torch's float64 results: torch's own float32 GELU is off by 1.2e-6 near x = -3.5
    # (its vectorised erf), where ours is within 4.5e-7 of the exact value
    assert max_error(M.gelu(x), F.gelu(x.double())) < 1e-6
    assert max_error(M.gelu(x), F.gelu(x)) < 2e-6
    assert max_error(M.gelu_tanh(x), F.gelu(x.double(), approximate="tanh")) < 1e-6
    assert max_error(M.gelu_tanh(x), F.gelu(x, approximate="tanh")) < 1e-6
    assert max_error(M.silu(x), F.silu(x.double())) < 1e-6
    assert max_error(M.silu(x), F.silu(x)) < 1e-6
    # the two GELUs really differ, so a test comparing a model that uses the wrong one fails
    assert (M.gelu(x) - M.gelu_tanh(x)).abs().max() > 1e-4


def test_softmax_log_softmax_cross_entropy_equal_torch():
    torch.manual_seed(0)
    logits = 10 * torch.randn(64, 501)
    targets = torch.randint(0, 501, (64,))
    assert (M.softmax(logits, dim=-1) - torch.softmax(logits, dim=-1)).abs().max() < 1e-6
    assert (M.softmax(logits, dim=0) - torch.softmax(logits, dim=0)).abs().max() < 1e-6
    assert max_error(M.log_softmax(logits), torch.log_softmax(logits, dim=-1)) < 1e-6
    assert max_error(M.cross_entropy(logits, targets), F.cross_entropy(logits, targets)) < 1e-6
    # no overflow where a naive exp would give inf
    big = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert torch.allclose(M.softmax(big), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.isfinite(M.log_softmax(big)[0, :2]).all()


# --- attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("q_shape, kv_len, mask_shape", [
    ((2, 3, 6, 8), 6, (6, 6)),            # square, one mask for every sequence and head
    ((2, 3, 4, 8), 9, (4, 9)),            # non-square: 4 queries read 9 keys
    ((2, 3, 5, 8), 7, (2, 1, 5, 7)),      # 4-D: one mask per sequence, broadcast over heads
    ((2, 3, 5, 8), 5, (2, 3, 5, 5)),      # 4-D: one mask per sequence and head
    ((7, 16), 11, (7, 11)),               # no batch dimensions at all
])
def test_scaled_dot_product_attention_equals_torch_with_any_boolean_mask(q_shape, kv_len,
                                                                         mask_shape):
    g = torch.Generator().manual_seed(sum(q_shape) + kv_len)
    for _ in range(5):
        q = torch.randn(q_shape, generator=g)
        k = torch.randn(q_shape[:-2] + (kv_len, q_shape[-1]), generator=g)
        v = torch.randn(q_shape[:-2] + (kv_len, 5), generator=g)   # values of another width
        mask = torch.rand(mask_shape, generator=g) < 0.5
        mask[..., 0] = True                   # no row without a key: softmax would be 0/0
        ours = M.scaled_dot_product_attention(q, k, v, mask)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert ours.shape == theirs.shape
        assert max_error(ours, theirs) < 1e-6
        assert not torch.equal(ours, M.scaled_dot_product_attention(q, k, v))  # mask mattered
    no_mask = M.scaled_dot_product_attention(q, k, v)
    assert max_error(no_mask, F.scaled_dot_product_attention(q, k, v)) < 1e-6


def test_own_linear_and_embedding_equal_torch():
    torch.manual_seed(0)
    for n_in, n_out, bias in [(32, 48, True), (48, 32, False), (1, 5, True)]:
        ours, theirs = M.Linear(n_in, n_out, bias), nn.Linear(n_in, n_out, bias)
        theirs.load_state_dict(ours.state_dict())           # same names and shapes
        x = torch.randn(3, 7, n_in)
        assert (ours(x) - theirs(x)).abs().max() < 1e-6
        assert (ours.bias is None) == (not bias)
    ours, theirs = M.Embedding(97, 16), nn.Embedding(97, 16)
    theirs.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 97, (4, 9))
    assert torch.equal(ours(idx), theirs(idx)) and ours(idx).shape == (4, 9, 16)


def classic_attention(attn: M.CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head attention exactly as GPT-2 writes it: chunk(3), a tril mask, softmax."""
    B, T, C = x.shape
    q, k, v = attn.qkv_proj(x).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, attn.n_heads, C // attn.n_heads).transpose(1, 2) for t in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (C // attn.n_heads) ** -0.5
    att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))
    y = torch.softmax(att, dim=-1) @ v
    return attn.out_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def test_attention_is_the_classic_multi_head_attention():
    torch.manual_seed(0)
    attn = M.CausalSelfAttention(small(attention="explicit"))
    assert attn.qkv_proj.weight.shape == (3 * 32, 32)
    x = torch.randn(3, 24, 32)
    assert (attn(x) - classic_attention(attn, x)).abs().max() < 1e-6


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_explicit_attention_equals_sdpa(n_kv_heads, pos):
    torch.manual_seed(0)
    explicit = M.GPT(small(attention="explicit", n_kv_heads=n_kv_heads, pos=pos))
    fused = M.GPT(small(attention="sdpa", n_kv_heads=n_kv_heads, pos=pos))
    fused.load_state_dict(explicit.state_dict())
    idx = torch.randint(0, 97, (3, 24))
    x = torch.randn(3, 24, 32)
    block_e, block_f = explicit.blocks[0].attn, fused.blocks[0].attn
    rope = (explicit.rope_cos[:24], explicit.rope_sin[:24]) if pos == "rope" else None
    assert (block_e(x, rope) - block_f(x, rope)).abs().max() < 1e-6
    assert (explicit(idx)[0] - fused(idx)[0]).abs().max() < 1e-5


def test_gqa_projection_width_and_grouping():
    config = small(n_kv_heads=2, attention="explicit")
    attn = M.CausalSelfAttention(config)
    assert attn.qkv_proj.out_features == 32 + 2 * 2 * 8   # d_model + 2 * n_kv_heads * head_dim
    # query heads 0, 1 share key/value head 0; heads 2, 3 share head 1 (Hugging Face's grouping)
    torch.manual_seed(0)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        attn.qkv_proj.weight[32 + 8:32 + 16].zero_()        # key head 1 -> zero scores
        attn.qkv_proj.weight[32 + 16 + 8:].zero_()          # value head 1 -> zero output
        attn.qkv_proj.bias.zero_()
        attn.out_proj.weight.copy_(torch.eye(32))
        attn.out_proj.bias.zero_()
    y = attn(x).view(1, 5, 4, 8)
    assert y[:, :, 2:].abs().max() == 0 and y[:, :, :2].abs().max() > 0


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_future_tokens_never_change_earlier_logits(attention, pos):
    torch.manual_seed(0)
    model = M.GPT(small(attention=attention, pos=pos, n_kv_heads=2)).eval()
    idx = torch.randint(0, 97, (2, 24))
    logits = model(idx)[0]
    for t in (23, 12, 1):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 1) % 97
        other = model(changed)[0]
        assert torch.equal(other[:, :t], logits[:, :t])
        assert not torch.allclose(other[:, t], logits[:, t])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 64
    cos, sin = M.rope_tables(head_dim, 1024, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m, n):
        return apply(q, m) @ apply(k, n)

    def apply(x, t):
        return M.apply_rope(x, cos[t], sin[t])

    for shift in (0, 1, 5, 100):
        base = score(shift, 0)
        for m in (shift + 1, shift + 37, 700, 1023):
            assert abs(score(m, m - shift) - base) < 1e-4 * max(1.0, abs(base.item()))
    assert abs(score(10, 0) - score(10, 5)) > 1e-2      # but the distance matters
    # a rotation keeps lengths: every pair is turned, not stretched
    assert torch.allclose(apply(q, 517).norm(), q.norm(), atol=1e-5)


def test_rope_rotates_pairs_split_in_halves():
    # pair (x_i, x_{i+d/2}) turns by t * theta^(-2i/d); here d = 4, pairs (0, 2) and (1, 3)
    cos, sin = M.rope_tables(4, 8, 100.0)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0])
    t = 3
    a0, a1 = t * 1.0, t * 100.0 ** (-2 / 4)
    expected = torch.tensor([math.cos(a0), -math.sin(a1), math.sin(a0), math.cos(a1)])
    assert torch.allclose(M.apply_rope(x, cos[t], sin[t]), expected, atol=1e-6)


# --- the model ------------------------------------------------------------------------------

def test_forward_shapes_and_initial_loss_is_ln_vocab():
    torch.manual_seed(0)
    for name in ("tiny", "cpu"):
        config = dataclasses.replace(M.PRESETS[name], n_layers=2)
        model = M.GPT(config)
        idx = torch.randint(0, config.vocab_size, (4, 64 if name == "cpu" else config.block_size))
        logits, loss = model(idx, idx.roll(-1, dims=1))
        assert logits.shape == (*idx.shape, config.vocab_size)
        # ln V + s²/2 for logits of standard deviation s; s = 0.02·sqrt(d_model) at init
        s = logits.std().item()
        assert abs(s - 0.02 * math.sqrt(config.d_model)) < 0.1 * s
        assert abs(loss.item() - math.log(config.vocab_size) - s * s / 2) < 0.01
        assert model(idx)[1] is None


def test_fused_ops_switch_gives_the_same_model():
    torch.manual_seed(0)
    for arch in (GPT2_LIKE, LLAMA_LIKE, dict(mlp="gelu")):
        ours = M.GPT(small(fused_ops=False, **arch))
        fused = M.GPT(small(fused_ops=True, **arch))
        fused.load_state_dict(ours.state_dict())
        idx = torch.randint(0, 97, (2, 24))
        (logits, loss), (fused_logits, fused_loss) = ours(idx, idx), fused(idx, idx)
        assert (logits - fused_logits).abs().max() < 1e-5
        assert abs(loss - fused_loss) < 1e-6


def test_weight_tying_and_initialisation():
    torch.manual_seed(0)
    config = dataclasses.replace(M.PRESETS["cpu"], n_layers=8)
    model = M.GPT(config)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_params() == M.param_count(config)
    assert abs(model.blocks[0].attn.qkv_proj.weight.std() - 0.02) < 1e-3
    residual = torch.cat([p.weight.flatten() for b in model.blocks
                          for p in (b.attn.out_proj, b.mlp.down_proj)])
    assert abs(residual.std() - 0.02 / math.sqrt(2 * 8)) < 2e-4
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    untied = M.GPT(dataclasses.replace(config, tie_weights=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == M.param_count(config) + config.vocab_size * config.d_model


def test_embeddings_are_nn_embedding_and_blocks_a_module_list():
    model = M.GPT(small(pos="learned"))
    assert isinstance(model.tok_emb, nn.Embedding) and isinstance(model.pos_emb, nn.Embedding)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    rope = M.GPT(small(pos="rope"))
    assert not hasattr(rope, "pos_emb")
    assert "rope_cos" not in rope.state_dict()        # buffers recomputed, never saved
    assert all(not k.endswith("causal") for k in M.GPT(small(attention="explicit")).state_dict())


@pytest.mark.parametrize("shape, every, part", [
    (dict(pos="rope", n_kv_heads=2), 1, "block"),        # every block, RoPE and GQA
    (dict(n_layers=3), 2, "block"), (dict(n_layers=3), 1, "attention"),
    (dict(n_layers=3), 3, "attention")])
def test_checkpointing_gives_identical_gradients(shape, every, part):
    torch.manual_seed(0)
    plain = M.GPT(small(**shape))
    ckpt = M.GPT(small(**shape, activation_checkpointing=True, checkpoint_every=every,
                       checkpoint_part=part))
    ckpt.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 24))
    for m in (plain, ckpt):
        m(idx, idx)[1].backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_selective_checkpointing_recomputes_the_chosen_parts():
    """Count forward calls: a recomputed part runs twice in one training step."""
    for every, part, expected in ((1, "block", [2, 2, 2, 2]), (2, "block", [2, 1, 2, 1]),
                                  (3, "attention", [2, 1, 1, 2])):
        model = M.GPT(small(n_layers=4, activation_checkpointing=True, checkpoint_every=every,
                            checkpoint_part=part))
        counts = [0] * 4
        for i, block in enumerate(model.blocks):
            count = lambda *a, i=i: counts.__setitem__(i, counts[i] + 1)
            block.attn.register_forward_pre_hook(count)      # fires again when recomputed
        idx = torch.randint(0, 97, (2, 8))
        model(idx, idx)[1].backward()
        assert counts == expected, (every, part, counts)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive"):
        small(checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_part must be"):
        small(checkpoint_part="mlp")


def test_param_formula_equals_numel_for_every_preset():
    for name, config in M.PRESETS.items():
        with torch.device("meta"):
            model = M.GPT(config)
        assert M.param_count(config) == sum(p.numel() for p in model.parameters()), name
        assert model.num_params() == M.param_count(config)
    assert M.param_count(M.PRESETS["gpt2"]) == 124_439_808
    for arch in (GPT2_LIKE, LLAMA_LIKE, dict(n_kv_heads=1, bias=False, norm="layernorm")):
        config = small(**arch)
        assert M.param_count(config) == M.GPT(config).num_params()


def test_presets():
    assert set(M.PRESETS) >= {"tiny", "cpu", "gpt2", "llama-small"}
    gpt2, llama = M.PRESETS["gpt2"], M.PRESETS["llama-small"]
    assert (gpt2.vocab_size, gpt2.block_size, gpt2.n_layers, gpt2.d_model) == (50257, 1024, 12, 768)
    assert llama.kv_heads < llama.n_heads and llama.ff_dim == 2048
    cpu = M.PRESETS["cpu"]
    assert cpu.attention == "sdpa" and cpu.dropout == 0
    assert M.param_count(M.PRESETS["tiny"]) < 50_000


def test_flops_formula_matches_flop_counter():
    # explicit attention: the counter sees its two matrix products, not the CPU flash kernel
    tiny = dataclasses.replace(M.PRESETS["tiny"], attention="explicit")
    for config in (tiny, small(attention="explicit", **LLAMA_LIKE), small(attention="explicit", n_kv_heads=1)):
        model = M.GPT(config)
        B, T = 3, config.block_size
        idx = torch.randint(0, config.vocab_size, (B, T))
        with FlopCounterMode(display=False) as forward:
            logits, loss = model(idx, idx)
        assert forward.get_total_flops() == B * T * M.flops_per_token(config) // 3
        with FlopCounterMode(display=False) as backward:
            loss.backward()
        assert backward.get_total_flops() == 2 * forward.get_total_flops()
    gpt2 = M.PRESETS["gpt2"]
    assert M.matmul_params(gpt2) == 12 * 12 * 768 ** 2 + 50257 * 768
    assert M.flops_per_token(gpt2, seq_len=2) == 6 * M.matmul_params(gpt2) + 12 * 12 * 2 * 768


# --- configs and errors ---------------------------------------------------------------------

def test_config_round_trip_and_unknown_keys():
    for config in M.PRESETS.values():
        assert M.GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GPTConfig fields.*n_layer"):
        M.GPTConfig.from_dict({"n_layer": 12})


@pytest.mark.parametrize("changes, message", [
    (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads=4 is not a multiple of n_kv_heads=3"),
    (dict(n_kv_heads=0), "not a multiple of n_kv_heads=0"),
    (dict(norm="batchnorm"), "norm must be"),
    (dict(mlp="relu"), "mlp must be"),
    (dict(pos="sinusoidal"), "pos must be"),
    (dict(attention="flash"), "attention must be"),
    (dict(dropout=1.0), "dropout must be"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(d_model=36, n_heads=4, pos="rope"), "head_dim=9 must be even"),
])
def test_bad_configs_are_refused_with_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        small(**changes)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_sequence_longer_than_block_size_is_refused(pos):
    model = M.GPT(small(pos=pos))
    with pytest.raises(ValueError, match="25 tokens is longer than block_size=24"):
        model(torch.zeros(1, 25, dtype=torch.long))


# --- against transformers -------------------------------------------------------------------

def scale_up(module: nn.Module, seed: int) -> None:
    """Random weights with std 0.2 and norm gains around 1, large enough to expose any mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_gain = p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.copy_(1.0 + 0.3 * noise if is_gain else 0.2 * noise)


def weights_of(hf, config, family: str) -> dict:
    """Our state dict of the transformers model hf, by the mapping of llm.pretrained."""
    from llm.pretrained import plan, to_ours
    sd = hf.state_dict()
    ours = {name: to_ours(how, [sd[t] for t in theirs])
            for name, (theirs, how) in plan(M.GPT(config).state_dict(), config, family).items()}
    if config.tie_weights:
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    return ours


def assert_same_logits(config, ours: dict, hf) -> None:
    """Our model with the copied weights ours == the transformers model hf, on every path."""
    idx = torch.randint(0, config.vocab_size, (3, config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        assert expected.std() > 1.0
        for attention in ("explicit", "sdpa"):
            for fused_ops in (False, True):
                model = M.GPT(dataclasses.replace(config, attention=attention, fused_ops=fused_ops))
                model.load_state_dict(ours)
                assert (model(idx)[0] - expected).abs().max() < 1e-5


def test_gpt2_config_equals_transformers_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    config = small(**GPT2_LIKE, attention="explicit", block_size=32, n_layers=3)
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, activation_function="gelu_new",
        layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, attn_implementation="eager")).eval()
    scale_up(hf, seed=1)
    ours = weights_of(hf, config, "gpt2")
    assert_same_logits(config, ours, hf)


def test_llama_config_equals_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = small(**LLAMA_LIKE, attention="explicit", block_size=32, n_layers=3, norm_eps=1e-6)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ff_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    scale_up(hf, seed=2)
    ours = weights_of(hf, config, "llama")
    assert_same_logits(config, ours, hf)
