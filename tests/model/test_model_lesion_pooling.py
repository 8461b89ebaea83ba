"""A lesion confined to ONE token of an anatomy is learned through the anatomy's query pooling (the
semantic-density problem: one token among dozens), and only through that token: when the tokens
under the lesion are left out of the anatomy, the same training learns nothing."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ctvlp.model.vision import QueryPool

TOKENS, CHANNELS, ANATOMY = 64, 16, 40  # a 4x4x4 feature grid; the anatomy holds 40 of its cells


def _toy(n: int, seed: int, lesion_allowed: bool, amplitude: float = 5.0):
    """n samples of token features N(0, 1) (16 channels: a norm of about 4); half carry a lesion: a fixed direction of norm
    ``amplitude`` added to ONE token, drawn among the anatomy's tokens (or, when not
    lesion_allowed, among the others)."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(CHANNELS, generator=torch.Generator().manual_seed(99)), dim=0)
    tokens = torch.randn(n, TOKENS, CHANNELS, generator=g)
    allowed = torch.zeros(n, 1, TOKENS, dtype=torch.bool)
    allowed[:, 0, :ANATOMY] = True
    labels = (torch.arange(n) % 2).float()
    pool = torch.arange(ANATOMY) if lesion_allowed else torch.arange(ANATOMY, TOKENS)
    where = pool[torch.randint(len(pool), (n,), generator=g)]
    tokens[torch.arange(n), where] += amplitude * direction * labels[:, None]
    return tokens, allowed, labels


def _train_and_score(lesion_allowed: bool) -> float:
    torch.manual_seed(0)
    pool, head = QueryPool(1, CHANNELS, 2), torch.nn.Linear(CHANNELS, 1)
    params = [*pool.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    tokens, allowed, labels = _toy(512, 0, lesion_allowed)
    for step in range(200):
        batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
        logits = head(pool(tokens[batch], allowed[batch])[:, 0]).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, allowed, labels = _toy(512, 1, lesion_allowed)  # held-out samples
    with torch.no_grad():
        scores = head(pool(tokens, allowed)[:, 0]).squeeze(-1)
    return roc_auc_score(labels.numpy(), scores.numpy())


@pytest.fixture(scope="module")
def learned_auc() -> float:
    return _train_and_score(lesion_allowed=True)


def test_a_one_token_lesion_is_learned_through_the_anatomy_query(learned_auc):
    assert learned_auc > 0.9, learned_auc


def test_it_is_not_learned_when_the_tokens_under_the_lesion_are_ignored():
    auc = _train_and_score(lesion_allowed=False)
    assert auc < 0.65, auc


def test_a_mean_of_the_anatomys_tokens_dilutes_the_same_lesion(learned_auc):
    """The reason for the query: the mean of 40 tokens keeps 1/40 of the lesion (a linear probe on
    it, fitted on the training samples, separates far worse)."""
    from sklearn.linear_model import LogisticRegression

    x, _, y = _toy(512, 0, True)
    xt, _, yt = _toy(512, 1, True)
    clf = LogisticRegression(max_iter=1000).fit(x[:, :ANATOMY].mean(1).numpy(), y.numpy())
    mean_auc = roc_auc_score(yt.numpy(), clf.decision_function(xt[:, :ANATOMY].mean(1).numpy()))
    assert mean_auc < learned_auc - 0.1, mean_auc
    assert np.isfinite(mean_auc)


def test_the_toy_lesion_is_one_token_of_the_anatomy():
    with_lesion, allowed, labels = _toy(16, 3, True)
    without, _, _ = _toy(16, 3, True, amplitude=0.0)  # the same draws, no lesion
    changed = (with_lesion - without).abs().sum(-1) > 0  # (n, tokens)
    assert changed.sum(1).tolist() == labels.int().tolist()  # one token in each positive, none else
    assert (changed & ~allowed[:, 0]).sum() == 0  # inside the anatomy
