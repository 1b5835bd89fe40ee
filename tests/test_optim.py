"""Optimizers against PyTorch's: SGD, AdamW with param groups, schedule, clipping, loss scaling."""
import copy
import math

import pytest
import torch
from torch import nn

from llm import optim


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread (conftest's one_thread)."""


class Net(nn.Module):
    """A stand-in with every kind of parameter the GPT has: embedding, norm, linear with bias, tied output."""

    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight           # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.norm(self.emb(idx)))))


def twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    a = Net()
    b = Net()
    b.load_state_dict(a.state_dict())
    return a, b


def test_param_groups_by_type_and_shape():
    net = Net()
    decay, no_decay = optim.param_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == {id(net.fc.weight)}
    assert ids(no_decay["params"]) == {id(net.emb.weight), id(net.norm.weight), id(net.norm.bias),
                                       id(net.fc.bias)}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_equals_torch(momentum):
    a, b = twins()
    opt_a = optim.SGD(a.parameters(), lr=0.1, momentum=momentum)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=momentum)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_adamw_equals_torch_over_100_steps():
    a, b = twins()
    opt_a = optim.AdamW(optim.param_groups(a, 0.1), lr=1e-2, betas=(0.9, 0.95))
    opt_b = torch.optim.AdamW(optim.param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    idx = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(2))
    for _ in range(100):                            # real gradients of a real loss, both copies
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(idx).logsumexp(-1).mean().backward()
            opt.step()
    worst = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert worst < 1e-6                              # in fact 0: same operations, same order
    assert (a.fc.weight - Net().fc.weight).abs().max() > 0.1   # and the weights did move


def test_adamw_state_round_trips():
    a, b = twins()
    opt_a = optim.AdamW(a.parameters(), lr=1e-2)
    for p in a.parameters():
        p.grad = torch.ones_like(p)
    opt_a.step()
    opt_b = optim.AdamW(b.parameters(), lr=1e-2)
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))   # as a checkpoint would
    for p in list(a.parameters()) + list(b.parameters()):
        p.grad = torch.full_like(p, 0.5)
    opt_a.step()
    opt_b.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kind", ["ours", "torch"])
def test_make_optimizer(kind):
    opt = optim.make_optimizer(Net(), kind, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                               device=torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="'ours', 'torch', 'sgd' or 'momentum'"):
        optim.make_optimizer(Net(), "adam", 1e-3, 0.1, (0.9, 0.95), torch.device("cpu"))


@pytest.mark.parametrize("kind, momentum", [("sgd", 0.0), ("momentum", 0.9)])
def test_make_optimizer_offers_sgd_and_momentum(kind, momentum):
    net = Net()
    opt = optim.make_optimizer(net, kind, lr=0.5, weight_decay=0.1, betas=(0.9, 0.95),
                               device=torch.device("cpu"))
    assert isinstance(opt, optim.SGD) and [g["momentum"] for g in opt.param_groups] == [momentum] * 2
    before = [p.detach().clone() for p in net.parameters()]
    for _ in range(2):                      # two steps of gradient 1: v = 1, then 1 + momentum
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    for b, a in zip(before, net.parameters()):   # no weight decay: only the gradient moves them
        assert torch.allclose(a, b - 0.5 * (2 + momentum))


def test_schedule_at_hand_computed_steps():
    lr = lambda s: optim.lr_at(s, max_lr=1e-3, warmup_steps=100, max_steps=2000, min_lr=1e-4)
    assert lr(0) == pytest.approx(1e-5)
    assert lr(49) == pytest.approx(5e-4)
    assert lr(99) == pytest.approx(1e-3)
    assert lr(100) == pytest.approx(1e-3)
    assert lr(1050) == pytest.approx(5.5e-4)            # cos(pi/2) = 0: halfway between
    assert lr(575) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr(2000) == pytest.approx(1e-4)
    assert lr(5000) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="min_lr"):
        optim.lr_at(0, max_lr=1e-4, warmup_steps=0, max_steps=10, min_lr=1e-3)


@pytest.mark.parametrize("max_norm", [0.5, 1e3])      # clipped, and left alone
def test_clipping_equals_torch(max_norm):
    a, b = twins()
    for pa, pb in zip(a.parameters(), b.parameters()):
        pa.grad = torch.randn_like(pa)
        pb.grad = pa.grad.clone()
    norm_a = optim.clip_grad_norm(a.parameters(), max_norm)
    norm_b = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    assert norm_a.item() == pytest.approx(norm_b.item(), rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-6, atol=1e-7)
    after = torch.stack([p.grad.norm() for p in a.parameters()]).norm().item()
    assert after == pytest.approx(min(max_norm, norm_b.item()), rel=1e-5)


def backward_scaled(net: nn.Module, scaler, overflow: bool) -> None:
    idx = torch.arange(10).view(2, 5)
    scaler.scale(net(idx).logsumexp(-1).mean()).backward()
    if overflow:                                     # what a float16 overflow leaves behind
        net.fc.weight.grad[0, 0] = math.inf


def test_loss_scaler_skips_an_overflowing_step():
    net = Net()
    opt = optim.AdamW(optim.param_groups(net, 0.1), lr=1e-2)
    scaler = optim.DynamicLossScaler(init_scale=2.0 ** 16)
    before = copy.deepcopy(net.state_dict())
    backward_scaled(net, scaler, overflow=True)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not opt.state                             # the optimizer never ran
    assert scaler.get_scale() == 2.0 ** 15
    opt.zero_grad()
    backward_scaled(net, scaler, overflow=False)
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(before["fc.weight"], net.fc.weight)


def test_loss_scaler_follows_gradscaler():
    """Same scales, same weights as torch.amp.GradScaler over clean and overflowing steps."""
    a, b = twins()
    opt_a, opt_b = optim.AdamW(a.parameters(), lr=1e-2), optim.AdamW(b.parameters(), lr=1e-2)
    ours = optim.DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    pattern = [False, True, False, False, False, False, True, True, False, False, False, False]
    for overflow in pattern:
        for net, opt, scaler in ((a, opt_a, ours), (b, opt_b, theirs)):
            opt.zero_grad()
            backward_scaled(net, scaler, overflow)
            scaler.unscale_(opt)                     # as the training loop does, before clipping
            scaler.step(opt)
            scaler.update()
        assert ours.get_scale() == theirs.get_scale()
    assert ours.get_scale() == 1024.0 / 8 * 2 * 2    # three halvings, two doublings
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_disabled_scaler_is_transparent():
    scaler = optim.DynamicLossScaler(enabled=False)
    loss = torch.tensor(2.5)
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0
