"""LoRA: an adapter with B = 0 is the base model, merging is exact, only adapters train,
and an adapter saved alone loads back onto the base."""
import dataclasses

import pytest
import torch

from llm import lora, model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (conftest's one_thread)."""


def tiny_gpt(seed: int = 0) -> model.GPT:
    torch.manual_seed(seed)
    return model.GPT(dataclasses.replace(model.PRESETS["tiny"], vocab_size=40)).eval()


IDS = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))


def test_zero_b_is_the_base_model_exactly():
    net = tiny_gpt()
    before, _ = net(IDS)
    names = lora.add_lora(net, r=4, alpha=8)
    assert names == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("qkv_proj", "out_proj")]
    after, _ = net(IDS)
    assert torch.equal(before, after)


def test_merged_equals_unmerged_and_unmerge_restores_the_weight():
    net = tiny_gpt()
    lora.add_lora(net, r=4, alpha=8, targets=("qkv_proj", "out_proj", "up_proj", "down_proj"))
    layers = [m for m in net.modules() if isinstance(m, lora.LoRALinear)]
    w0 = [m.base.weight.clone() for m in layers]
    with torch.no_grad():
        for m in layers:
            m.B.normal_(std=0.05)        # a trained adapter: B no longer zero
    unmerged, _ = net(IDS)
    for m in layers:
        m.merge()
    merged, _ = net(IDS)
    assert not torch.allclose(merged, tiny_gpt()(IDS)[0], atol=1e-3)   # the adapter matters
    assert torch.allclose(merged, unmerged, atol=1e-6, rtol=0)
    for m, w in zip(layers, w0):
        m.unmerge()
        assert torch.allclose(m.base.weight, w, atol=1e-6, rtol=0)
    lora.merge_lora(net)
    assert not any(isinstance(m, lora.LoRALinear) for m in net.modules())
    assert torch.allclose(net(IDS)[0], unmerged, atol=1e-6, rtol=0)
    assert set(net.state_dict()) == set(tiny_gpt().state_dict())   # a plain GPT again


def test_only_the_adapters_receive_gradients():
    net = tiny_gpt()
    lora.add_lora(net, r=2, alpha=4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, lora.LoRALinear):
                m.B.normal_(std=0.05)
    _, loss = net(IDS, targets=IDS)
    loss.backward()
    for name, p in net.named_parameters():
        is_adapter = name.endswith((".A", ".B"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    d = net.config.d_model
    assert trainable == 2 * 2 * ((d + 3 * d) + (d + d))   # layers x r x (d_in + d_out), summed


def test_an_adapter_saved_alone_loads_onto_the_base(tmp_path):
    net = tiny_gpt()
    lora.add_lora(net, r=4, alpha=8)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, lora.LoRALinear):
                m.A.normal_()
                m.B.normal_(std=0.05)
    expected, _ = net(IDS)
    lora.save_adapter(net, tmp_path / "adapter.safetensors")
    base = tiny_gpt()                                  # the same base weights, no adapter
    lora.load_adapter(base, tmp_path / "adapter.safetensors")
    assert torch.equal(base(IDS)[0], expected)
    small = (tmp_path / "adapter.safetensors").stat().st_size
    assert small < 0.3 * sum(p.numel() * 4 for p in tiny_gpt().parameters())
    other = model.GPT(dataclasses.replace(model.PRESETS["tiny"], vocab_size=40, d_model=64))
    with pytest.raises(ValueError, match="has no place in this model"):
        lora.load_adapter(other, tmp_path / "adapter.safetensors")


def test_a_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoRALinear(torch.nn.Linear(4, 4), 0, 1.0)
