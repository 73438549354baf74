"""The selection network (fusion/objectives/selection.py): features, the quality predictor, noisy top-k,
the exploration schedule, and, on a synthetic bandit, why noise and balancing keep the
selector from collapsing onto the sources it tried first.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from fusion.objectives.losses import feedback_loss, selector_loss
from fusion.objectives.selection import SourceSelector, exploration_scale, noisy_top_k, prompt_features

# ---------------------------------------------------------------------------------------------
# prompt_features
# ---------------------------------------------------------------------------------------------


def test_prompt_features_averages_only_prompt_positions():
    # B=2, L=3, D=2
    hidden = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 6.0], [100.0, -100.0]],  # prompt = positions 0, 1
            [[50.0, 50.0], [2.0, 0.0], [4.0, 8.0]],  # prompt = positions 1, 2
        ],
        requires_grad=True,
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    feats = prompt_features(hidden, mask)
    assert feats.shape == (2, 2)
    assert torch.allclose(feats, torch.tensor([[2.0, 4.0], [3.0, 4.0]]))
    assert not feats.requires_grad  # detached: the selector never trains the student
    assert feats.grad_fn is None


def test_prompt_features_bool_mask_single_token_and_empty_prompt():
    hidden = torch.tensor([[[1.0, -1.0], [7.0, 9.0]], [[5.0, 5.0], [6.0, 6.0]]])
    mask = torch.tensor([[False, True], [False, False]])
    feats = prompt_features(hidden, mask)
    assert torch.allclose(feats, torch.tensor([[7.0, 9.0], [0.0, 0.0]]))  # empty prompt -> 0, no NaN


def test_prompt_features_returns_float32():
    hidden = torch.ones(1, 2, 4, dtype=torch.bfloat16)
    feats = prompt_features(hidden, torch.ones(1, 2))
    assert feats.dtype == torch.float32
    assert torch.allclose(feats, torch.ones(1, 4))


# ---------------------------------------------------------------------------------------------
# SourceSelector
# ---------------------------------------------------------------------------------------------


def test_source_selector_output_shape():
    torch.manual_seed(0)
    selector = SourceSelector(feature_dim=16, num_sources=6, hidden_dim=32)
    assert selector(torch.randn(5, 16)).shape == (5, 6)


def test_source_selector_initial_quality_sets_bias_and_starting_predictions():
    torch.manual_seed(0)
    init = [0.0, -6.0, -6.0, -6.0, -6.0, -6.0]
    selector = SourceSelector(16, 6, initial_quality=init)
    assert torch.equal(selector.net[-1].bias.detach(), torch.tensor(init))
    features = torch.randn(8, 16)
    with torch.no_grad():
        u = selector(features)
        # the last layer starts small (weights scaled by 0.1): predictions start near the bias
        assert (u - torch.tensor(init)).abs().max() < 0.5
        assert torch.all(u.argmax(-1) == 0)  # pessimistic start: source 0 is tried first
        # with the last layer's weights zeroed the output is exactly the initial quality
        selector.net[-1].weight.zero_()
        assert torch.equal(selector(features), torch.tensor(init).expand(8, 6))
        assert torch.equal(selector(torch.zeros(3, 16)), torch.tensor(init).expand(3, 6))


def test_source_selector_scalar_and_default_initial_quality():
    torch.manual_seed(0)
    assert torch.equal(SourceSelector(4, 3, initial_quality=-2.5).net[-1].bias.detach(), torch.full((3,), -2.5))
    assert torch.equal(SourceSelector(4, 3).net[-1].bias.detach(), torch.full((3,), -1.0))


def test_source_selector_trains_from_selector_loss():
    """The regression's gradient reaches every layer; on the output bias it is d/db_j mean((u + CE)^2) = sum_b 2 (u_bj + CE_bj) / 6."""
    torch.manual_seed(0)
    selector = SourceSelector(4, 3)
    u = selector(torch.randn(2, 4))
    loss = selector_loss(u, torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert torch.allclose(selector.net[-1].bias.grad, (2 * (u.detach() + 1.0) / 6).sum(0), atol=1e-6)
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in selector.parameters())


# ---------------------------------------------------------------------------------------------
# noisy_top_k / exploration_scale
# ---------------------------------------------------------------------------------------------


def test_noisy_top_k_without_noise_is_plain_top_k():
    u = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, -5.0, 0.0, 4.0]])
    assert noisy_top_k(u, 1).tolist() == [[1], [0]]
    assert noisy_top_k(u, 2).tolist() == [[1, 3], [0, 3]]
    g = torch.Generator().manual_seed(0)
    assert noisy_top_k(u, 2, noise_scale=0.0, generator=g).tolist() == [[1, 3], [0, 3]]
    u_grad = u.clone().requires_grad_(True)
    assert torch.equal(noisy_top_k(u_grad, 2), torch.topk(u, 2, dim=-1).indices)


def test_noisy_top_k_with_noise_varies_but_large_margin_wins():
    rows = 20000
    u = torch.tensor([3.0, 0.0, 0.0, 0.0]).expand(rows, 4)
    g = torch.Generator().manual_seed(0)
    chosen = noisy_top_k(u, 1, noise_scale=1.0, generator=g)[:, 0]
    counts = torch.bincount(chosen, minlength=4).float() / rows
    assert all(counts[1:] > 0)  # the choice varies across rows
    # Gumbel-max: P(choose i) = softmax(u / scale)_i; here e^3 / (e^3 + 3) = 0.870
    assert counts[0].item() == pytest.approx(math.exp(3) / (math.exp(3) + 3), abs=0.015)
    # scale 2 flattens it: e^1.5 / (e^1.5 + 3) = 0.599
    chosen = noisy_top_k(u, 1, noise_scale=2.0, generator=g)[:, 0]
    assert (chosen == 0).float().mean().item() == pytest.approx(math.exp(1.5) / (math.exp(1.5) + 3), abs=0.015)
    # a margin of 8 nats: the best source wins essentially always (softmax gives 0.99899)
    u_big = torch.tensor([8.0, 0.0, 0.0, 0.0]).expand(rows, 4)
    assert (noisy_top_k(u_big, 1, 1.0, g)[:, 0] == 0).float().mean().item() > 0.997
    # k = 2 with noise: two distinct sources per row, the best one almost always among them
    top2 = noisy_top_k(u, 2, 1.0, g)
    assert torch.all(top2[:, 0] != top2[:, 1])
    assert (top2 == 0).any(1).float().mean().item() > 0.95


def test_noisy_top_k_seeded_generator_is_deterministic():
    u = torch.zeros(50, 6)
    a = noisy_top_k(u, 2, 1.0, torch.Generator().manual_seed(7))
    b = noisy_top_k(u, 2, 1.0, torch.Generator().manual_seed(7))
    c = noisy_top_k(u, 2, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a[:, 0].tolist())) > 1  # equal qualities: the noise spreads the choice


def test_exploration_scale_schedule():
    assert exploration_scale(0, 1.0, 200) == pytest.approx(1.0)
    assert exploration_scale(100, 1.0, 200) == pytest.approx(0.5)
    assert exploration_scale(150, 2.0, 200) == pytest.approx(0.5)
    assert exploration_scale(200, 1.0, 200) == pytest.approx(0.0)
    assert exploration_scale(1000, 1.0, 200) == 0.0  # stays at 0 after the anneal
    # anneal_steps = 0 means no exploration at all, from the first step
    assert exploration_scale(0, 1.0, 0) == 0.0
    assert exploration_scale(5, 1.0, 0) == 0.0
    assert exploration_scale(0, 0.0, 100) == 0.0


# ---------------------------------------------------------------------------------------------
# The collapse test: a synthetic contextual bandit
# ---------------------------------------------------------------------------------------------

N_SOURCES, N_DOMAINS, FEATURE_DIM = 6, 4, 16
WEAK, LIAR = 4, 5
PESSIMISTIC = [0.0] + [-6.0] * (N_SOURCES - 1)


@contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: faster, and no fight with a concurrent trainer
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Bandit:
    """4 domain specialists (sources 0-3), a weak generalist (4), a confident liar (5).

    Features: a fixed random embedding per domain plus N(0, 0.1^2) noise.
    Observed CE: specialist on its own domain 0.2, on other domains 3.0; weak 2.0; liar 5.0;
    plus N(0, 0.1^2) noise.
    """

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.embedding = torch.randn(N_DOMAINS, FEATURE_DIM, generator=g)
        self.ce = torch.full((N_DOMAINS, N_SOURCES), 3.0)
        self.ce[torch.arange(N_DOMAINS), torch.arange(N_DOMAINS)] = 0.2
        self.ce[:, WEAK] = 2.0
        self.ce[:, LIAR] = 5.0

    def sample(self, batch: int, g: torch.Generator):
        domain = torch.randint(0, N_DOMAINS, (batch,), generator=g)
        features = self.embedding[domain] + 0.1 * torch.randn(batch, FEATURE_DIM, generator=g)
        ce = (self.ce[domain] + 0.1 * torch.randn(batch, N_SOURCES, generator=g)).clamp(min=0.01)
        return domain, features, ce


def run_bandit(k: int, beta: float, noise: float, anneal_steps: int = 200, steps: int = 600, seed: int = 0):
    """Train a SourceSelector online on the bandit; return selection shares and eval accuracy."""
    with _single_thread():
        torch.manual_seed(seed)
        bandit = Bandit(seed)
        data_g = torch.Generator().manual_seed(seed + 1)
        noise_g = torch.Generator().manual_seed(seed + 2)
        selector = SourceSelector(FEATURE_DIM, N_SOURCES, initial_quality=PESSIMISTIC)
        optimizer = torch.optim.Adam(selector.parameters(), lr=1e-2)
        total = torch.zeros(N_SOURCES)
        last = torch.zeros(N_SOURCES)
        for step in range(steps):
            _, features, ce = bandit.sample(64, data_g)
            u = selector(features)
            selected = noisy_top_k(u, k, exploration_scale(step, noise, anneal_steps), noise_g)
            observed = torch.zeros_like(u, dtype=torch.bool).scatter_(1, selected, True)
            loss = selector_loss(u, ce, observed) + beta * feedback_loss(torch.softmax(u / 1.0, dim=-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            counts = torch.bincount(selected.flatten(), minlength=N_SOURCES).float()
            total += counts
            if step >= steps - 100:
                last += counts
        domain, features, _ = bandit.sample(2000, torch.Generator().manual_seed(seed + 3))
        with torch.no_grad():
            chosen = noisy_top_k(selector(features), k)  # eval: argmax / top-k of u, no noise
    return {
        "share_total": (total / total.sum()).tolist(),
        "share_last100": (last / last.sum()).tolist(),
        "accuracy": (chosen == domain[:, None]).any(1).float().mean().item(),
        "liar_at_eval": (chosen == LIAR).any(1).float().mean().item(),
        "specialists_at_eval": [(chosen == s).any(1).float().mean().item() for s in range(N_DOMAINS)],
    }


# Measured with these seeds (seed 0; seeds 1-3 give the same picture):
#   k=1, beta=0,   no noise: last-100 share of source 0 = 1.00, eval accuracy 0.26
#   k=1, beta=0.1, no noise: shares 0.25/0.25/0.25/0.25/0/0, accuracy 1.00, liar 0
#   k=1, beta=0,   noise 1.0 annealed over 200 steps: same as above, accuracy 1.00
#   k=2, beta=0,   no noise: stuck on a subset (specialists 1 and 3 never tried), accuracy 0.52
#   k=2, beta=0.1 or noise 1.0: accuracy 1.00, second slot mostly the weak source, liar 0


@pytest.mark.slow
def test_collapse_without_feedback_or_noise_k1():
    r = run_bandit(k=1, beta=0.0, noise=0.0)
    assert r["share_last100"][0] >= 0.95  # locked onto the first source it tried
    assert r["share_total"][0] >= 0.95
    assert r["accuracy"] <= 0.35  # right only on source 0's own domain (~1/4 of inputs)
    assert r["specialists_at_eval"][0] >= 0.95


@pytest.mark.slow
def test_collapse_without_feedback_or_noise_k2_gets_stuck():
    r = run_bandit(k=2, beta=0.0, noise=0.0)
    assert min(r["share_last100"][:N_DOMAINS]) == 0.0  # some specialist is never tried any more
    assert r["accuracy"] <= 0.6


@pytest.mark.parametrize(
    "k,beta,noise",
    [
        (1, 0.1, 0.0),  # feedback loss alone
        (1, 0.0, 1.0),  # annealed Gumbel exploration alone
        (2, 0.1, 0.0),
        (2, 0.0, 1.0),
    ],
)
@pytest.mark.slow
def test_feedback_or_exploration_rescues_selector(k, beta, noise):
    r = run_bandit(k=k, beta=beta, noise=noise, anneal_steps=200)
    # every specialist keeps being selected (k=1: each ~25% of the last 100 steps)
    assert min(r["share_last100"][:N_DOMAINS]) >= (0.18 if k == 1 else 0.09)
    assert all(s > 0.09 for s in r["share_total"][:N_DOMAINS])
    # the right specialist is chosen (k=1) or among the two chosen (k=2) at eval, no noise
    assert r["accuracy"] >= 0.9
    assert r["liar_at_eval"] == 0.0
    if k == 1:
        assert r["share_last100"][WEAK] <= 0.02 and r["share_last100"][LIAR] <= 0.02
    else:
        assert r["share_last100"][LIAR] <= 0.02


def test_likelihood_regression_ranks_sources_by_how_often_they_are_right():
    """Source 0 is right on 80% of prompts (sequence NLL 0.02) and confidently wrong on the rest
    (NLL 10); source 1 is always unsure (NLL 0.6). Fitted onto -NLL ("mse") the selector prefers
    source 1 (mean -2.02 against -0.6); onto the probability ("likelihood": mean 0.78 against
    0.55) it prefers source 0, as accuracy does."""
    from fusion.objectives.losses import selector_loss
    from fusion.objectives.selection import SourceSelector, fit_selector

    assert float(
        selector_loss(torch.log(torch.tensor([[0.5]])), -torch.log(torch.tensor([[0.7]])), torch.tensor([[True]]), "likelihood")
    ) == pytest.approx(0.04)
    torch.manual_seed(0)
    features = torch.randn(100, 8)
    ce = torch.stack([torch.where(torch.arange(100) % 5 == 0, 10.0, 0.02), torch.full((100,), 0.6)], dim=1)
    observed = torch.ones_like(ce, dtype=torch.bool)
    picks = {}
    for loss in ("mse", "likelihood"):
        selector = SourceSelector(8, 2, 16, -1.0)
        fit_selector(selector, features, ce, observed, 200, 3e-3, loss)
        with torch.no_grad():
            picks[loss] = selector(torch.randn(200, 8)).argmax(-1).float().mean().item()  # share picking source 1
    assert picks["mse"] > 0.9 and picks["likelihood"] < 0.1
    with pytest.raises(ValueError, match="model.selector_loss must be one of"):
        selector_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "l1")
