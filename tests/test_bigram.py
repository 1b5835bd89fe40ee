"""Predicting the next token: the loss, the bigram model by counting and by gradient descent,
gradients by hand against autograd and finite differences."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm import bigram


def markov_chain(V: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """n tokens from a random Markov chain over V tokens, its transition matrix and entropy rate."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(V, 0.5), size=V)            # peaked rows, all pairs possible
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = 0
    u = rng.random(n)
    cdf = P.cumsum(axis=1)
    for t in range(1, n):
        tokens[t] = min(np.searchsorted(cdf[tokens[t - 1]], u[t]), V - 1)
    # The stationary distribution pi solves pi P = pi; entropy rate = sum_a pi_a H(P_a).
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi /= pi.sum()
    return tokens, P, float(-(pi[:, None] * P * np.log(P)).sum())


@pytest.fixture(scope="module")
def chain():
    tokens, P, entropy = markov_chain(V=8, n=120_000, seed=0)
    return tokens[:100_000], tokens[100_000:], P, entropy


# --- The loss -----------------------------------------------------------------------------

def test_cross_entropy_equals_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 4
    logits[0, 0, 3] = 1000.0                      # exp(1000) overflows unless shifted
    targets = torch.randint(17, (3, 5), generator=g)
    ours = bigram.cross_entropy(logits, targets)
    theirs = F.cross_entropy(logits.reshape(-1, 17), targets.reshape(-1))
    assert torch.isfinite(ours)
    assert abs(ours.item() - theirs.item()) < 1e-12
    assert torch.allclose(bigram.log_softmax(logits), F.log_softmax(logits, dim=-1), atol=1e-12)


def test_cross_entropy_rejects_mismatched_targets():
    with pytest.raises(ValueError, match=r"targets of shape \(2, 4\)"):
        bigram.cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("V", [2, 256, 4096])
def test_uniform_model_loss_is_ln_V(V):
    ids = torch.randint(V, (4, 9), generator=torch.Generator().manual_seed(V))
    assert abs(bigram.cross_entropy(torch.zeros(4, 9, V), ids).item() - math.log(V)) < 1e-5
    _, loss = bigram.Bigram(V)(ids[:, :-1], ids[:, 1:])      # a fresh model is uniform
    assert abs(loss.item() - math.log(V)) < 1e-5
    tokens = ids.reshape(-1).numpy()
    huge_alpha = bigram.bigram_log_probs(bigram.bigram_counts(tokens, V), alpha=1e12)
    assert abs(bigram.bigram_loss(huge_alpha, tokens) - math.log(V)) < 1e-5


def test_bits_per_byte():
    assert bigram.bits_per_byte(math.log(256), 1000, 1000) == pytest.approx(8.0)
    # 2 nats per token, 4 bytes per token: 2 * 1 / (4 ln 2) bits per byte
    assert bigram.bits_per_byte(2.0, 250, 1000) == pytest.approx(0.5 / math.log(2))
    with pytest.raises(ValueError, match="0 bytes"):
        bigram.bits_per_byte(1.0, 10, 0)


# --- Counting -----------------------------------------------------------------------------

def test_bigram_counts_by_hand():
    counts = bigram.bigram_counts(np.array([0, 1, 1, 2, 0, 1], dtype=np.uint16), 3)
    assert counts.tolist() == [[0, 2, 0],
                               [0, 1, 1],
                               [1, 0, 0]]
    log_probs = bigram.bigram_log_probs(counts, alpha=0.0)
    assert torch.allclose(log_probs.exp()[1], torch.tensor([0.0, 0.5, 0.5]))
    smoothed = bigram.bigram_log_probs(counts, alpha=1.0).exp()
    assert torch.allclose(smoothed[0], torch.tensor([1 / 5, 3 / 5, 1 / 5]))   # (C + 1) / (2 + 3)


def test_bigram_counts_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"\[0, 3\), got ids from 0 to 3"):
        bigram.bigram_counts(np.array([0, 3, 1]), 3)
    with pytest.raises(ValueError, match="at least 2"):
        bigram.bigram_counts(np.array([1]), 3)
    with pytest.raises(ValueError, match="alpha"):
        bigram.bigram_log_probs(torch.zeros(3, 3), alpha=-1)


def test_counting_is_maximum_likelihood(chain):
    """The count table beats every perturbation of itself on the training text."""
    train, _, _, _ = chain
    log_probs = bigram.bigram_log_probs(bigram.bigram_counts(train, 8), alpha=0.0)
    best = bigram.bigram_loss(log_probs, train)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        other = torch.log_softmax(log_probs.double() + 0.05 * torch.randn(8, 8, generator=g), dim=1)
        assert bigram.bigram_loss(other, train) > best


def test_counting_model_recovers_the_chain(chain):
    """On a known Markov chain the counted model's val loss is the chain's entropy rate."""
    train, val, P, entropy = chain
    log_probs = bigram.bigram_log_probs(bigram.bigram_counts(train, 8), alpha=0.1)
    assert torch.allclose(log_probs.exp().double(), torch.from_numpy(P), atol=0.02)
    assert abs(bigram.bigram_loss(log_probs, val) - entropy) < 0.02


def test_unseen_pair_is_infinite_without_smoothing():
    train, val = np.array([0, 1, 0, 1, 0]), np.array([0, 0, 1])     # (0, 0) never in train
    counts = bigram.bigram_counts(train, 2)
    assert bigram.bigram_loss(bigram.bigram_log_probs(counts, 0.0), val) == math.inf
    assert math.isfinite(bigram.bigram_loss(bigram.bigram_log_probs(counts, 0.5), val))


# --- Gradients by hand --------------------------------------------------------------------

V, D, N = 11, 5, 64


def make_params(dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embedding": torch.randn(V, D, generator=g, dtype=dtype),
            "weight": torch.randn(V, D, generator=g, dtype=dtype) / D ** 0.5,
            "bias": torch.randn(V, generator=g, dtype=dtype) * 0.1}


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(V - 1, (N,), generator=g)     # token V-1 never occurs: its row gets 0
    x[:4] = 3                                        # repeated ids: the scatter-add must sum
    return x, torch.randint(V, (N,), generator=g)


def autograd_gradients(params, x, y):
    leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
    logits = leaves["embedding"][x] @ leaves["weight"].T + leaves["bias"]
    loss = F.cross_entropy(logits, y)                # torch's loss, torch's backward
    loss.backward()
    return loss, {name: p.grad for name, p in leaves.items()}


def test_hand_written_gradients_equal_autograd():
    params, (x, y) = make_params(), make_batch()
    loss, grads = bigram.manual_gradients(params, x, y)
    ref_loss, ref_grads = autograd_gradients(params, x, y)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    for name in params:
        assert grads[name].shape == params[name].shape
        assert (grads[name] - ref_grads[name]).abs().max() < 1e-6, name
        assert torch.allclose(grads[name], ref_grads[name], rtol=0, atol=1e-14), name
    assert grads["embedding"][V - 1].abs().max() == 0          # an absent token: no gradient


def test_manual_step_equals_autograd_step():
    params, (x, y) = make_params(), make_batch()
    expected = {name: p.clone() for name, p in params.items()}
    _, ref_grads = autograd_gradients(params, x, y)
    for name in expected:
        expected[name] -= 0.5 * ref_grads[name]
    loss = bigram.manual_step(params, x, y, lr=0.5)
    for name in params:
        assert (params[name] - expected[name]).abs().max() < 1e-12, name
    assert bigram.manual_gradients(params, x, y)[0].item() < loss      # the step helped


def test_embedding_backward_sums_repeated_ids():
    grad = bigram.embedding_backward(torch.tensor([2, 0, 2]), torch.tensor([[1.0], [10.0], [100.0]]), 3)
    assert grad.tolist() == [[10.0], [0.0], [101.0]]


def test_finite_differences_agree_with_hand_gradients():
    params, (x, y) = make_params(), make_batch()
    _, grads = bigram.manual_gradients(params, x, y)

    def loss_fn():
        return bigram.manual_gradients(params, x, y)[0]

    for name, p in params.items():
        numeric = bigram.finite_difference(loss_fn, p)
        assert (numeric - grads[name]).abs().max() < 1e-8, name
    assert torch.equal(params["bias"], make_params()["bias"])     # restored after the check


def test_finite_differences_of_a_known_function():
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    numeric = bigram.finite_difference(lambda: (w ** 3).sum(), w)
    assert torch.allclose(numeric, 3 * w ** 2, atol=1e-8)


# --- The learned table --------------------------------------------------------------------

def test_count_loss_equals_mean_over_pairs(chain):
    train = chain[0][:2000]
    g = torch.Generator().manual_seed(0)
    model = bigram.Bigram(8).double()
    with torch.no_grad():
        model.table.weight.copy_(torch.randn(8, 8, generator=g, dtype=torch.float64))
    counts = bigram.bigram_counts(train, 8).double()
    t = torch.from_numpy(train)
    _, direct = model(t[None, :-1], t[None, 1:])
    assert abs(bigram.count_loss(model, counts).item() - direct.item()) < 1e-12


def test_trained_bigram_reaches_counting_loss(chain):
    train, val, _, _ = chain
    counts = bigram.bigram_counts(train, 8)
    counted = bigram.bigram_log_probs(counts, alpha=0.1)
    model = bigram.Bigram(8)
    losses = bigram.train_bigram(model, counts + 0.1, steps=200, lr=20.0)
    assert losses[0] == pytest.approx(math.log(8), abs=1e-6)
    assert losses[-1] < losses[0]
    learned = bigram.log_softmax(model.table.weight.detach())
    for split in (train, val):
        assert abs(bigram.bigram_loss(learned, split) - bigram.bigram_loss(counted, split)) < 0.01


def test_adam_reaches_counting_loss_too(chain):
    train, val, _, _ = chain
    counts = bigram.bigram_counts(train, 8)
    counted = bigram.bigram_log_probs(counts, alpha=0.1)
    model = bigram.Bigram(8)
    bigram.train_bigram(model, counts + 0.1, steps=150, lr=0.3, optimizer="adam")
    learned = bigram.log_softmax(model.table.weight.detach())
    assert abs(bigram.bigram_loss(learned, val) - bigram.bigram_loss(counted, val)) < 0.01
    with pytest.raises(ValueError, match="'sgd'"):
        bigram.train_bigram(model, counts, steps=1, lr=1.0, optimizer="sgd")


def test_train_bigram_zeroes_gradients_between_steps():
    """Two steps from the same start must equal one step repeated: no stale gradient left over."""
    counts = torch.tensor([[5.0, 1.0], [2.0, 7.0]])
    a, b = bigram.Bigram(2), bigram.Bigram(2)
    bigram.train_bigram(a, counts, steps=2, lr=1.0)
    bigram.train_bigram(b, counts, steps=1, lr=1.0)
    bigram.train_bigram(b, counts, steps=1, lr=1.0)
    assert torch.equal(a.table.weight, b.table.weight)


# --- Sampling -----------------------------------------------------------------------------

def test_sample_follows_the_table():
    # A deterministic cycle 0 -> 2 -> 1 -> 0: the sample can only be that cycle.
    table = torch.full((3, 3), -math.inf)
    table[0, 2] = table[2, 1] = table[1, 0] = 0.0
    assert bigram.sample(table, 0, 7, torch.Generator().manual_seed(0)) == [0, 2, 1, 0, 2, 1, 0]


def test_sample_is_reproducible_and_has_the_table_statistics(chain):
    train, _, P, _ = chain
    log_probs = bigram.bigram_log_probs(bigram.bigram_counts(train, 8), alpha=0.1)
    one = bigram.sample(log_probs, 0, 20_000, torch.Generator().manual_seed(3))
    two = bigram.sample(log_probs, 0, 20_000, torch.Generator().manual_seed(3))
    assert one == two
    refit = bigram.bigram_log_probs(bigram.bigram_counts(np.array(one), 8), alpha=0.1)
    assert (refit.exp() - log_probs.exp()).abs().max() < 0.05     # counting the sample gives the table back


# --- The command --------------------------------------------------------------------------

def test_bigram_command(tmp_path, capsys):
    """`python -m llm bigram` on a small character corpus: losses, bits per byte, a sample."""
    from llm import data
    from llm.__main__ import main
    text = "".join(f"the {w} sat on the mat.\n" for w in ("cat", "dog", "rat", "bat") * 40)
    out = tmp_path / "tiny"
    meta = data.prepare(out, [("tiny.txt", text)], "tiny.txt", tokenizer="char", progress=False)
    assert main(["bigram", "--data", str(out), "--steps", "60", "--sample", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    uniform, counted, learned = (next(l for l in lines if l.startswith(k))
                                 for k in ("uniform", "counted", "learned"))
    V = meta["vocab_size"]
    assert f"val {math.log(V):.4f} nats" in uniform
    val = {name: float(line.split("val ")[1].split()[0]) for name, line in
           (("counted", counted), ("learned", learned))}
    assert val["counted"] < math.log(V) / 2
    assert abs(val["learned"] - val["counted"]) < 0.05
    assert any(l.startswith("compressors, val after train: gzip") for l in lines)
    assert lines[-1]                              # the sample was decoded and printed


def test_compressor_bits_per_byte_charges_only_the_new_text():
    text = b"to be or not to be, that is the question\n" * 50
    bpb = bigram.compressor_bits_per_byte(text, text)          # seen before: almost free
    fresh = bigram.compressor_bits_per_byte(b"", text)
    assert set(bpb) == {"gzip", "bzip2", "xz"}
    assert all(bpb[k] < fresh[k] for k in bpb) and bpb["xz"] < 0.1
