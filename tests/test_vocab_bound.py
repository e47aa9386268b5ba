"""The lower bound on the vocabulary's log-sum-exp that the pruned label search rules labels out
with: never above the exact value, whatever the clusters, the bias, the soft-cap or the head's
training; exact when every cluster is scored; the clusters kept on disk for a large vocabulary."""

import pytest
import torch

import softprompt.vocab_bound as vocab_bound
from softprompt.vocab_bound import VocabClusters, cached_assignment, cluster_rows
from softprompt.vocab_loss import soft_cap


def exact_lse(hidden, weight, softcap=None, bias=None):
    return soft_cap(torch.nn.functional.linear(hidden, weight, bias), softcap).logsumexp(-1)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("exact_clusters", [1, 4, 1000])
def test_the_bound_is_never_above_the_exact_value_and_is_exact_when_every_cluster_is_scored(
    monkeypatch, softcap, with_bias, exact_clusters
):
    monkeypatch.setattr(vocab_bound, "EXACT_CLUSTERS", exact_clusters)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(800, 24, generator=generator)
    hidden = 2 * torch.randn(64, 24, generator=generator)
    bias = torch.randn(800, generator=generator) if with_bias else None
    clusters = VocabClusters.of(weight, cluster_rows(weight))
    lower = clusters.lower_log_sum_exp(hidden, weight, softcap, bias)
    exact = exact_lse(hidden, weight, softcap, bias)
    assert (lower <= exact + 1e-5).all()
    if exact_clusters >= len(clusters.starts) - 1:
        torch.testing.assert_close(lower, exact)
    else:
        assert (lower < exact - 1e-3).any()  # a real bound, not the exact value by accident


def test_the_means_of_the_unscored_clusters_tighten_the_bound(monkeypatch):
    monkeypatch.setattr(vocab_bound, "EXACT_CLUSTERS", 2)
    generator = torch.Generator().manual_seed(1)
    weight, hidden = torch.randn(800, 24, generator=generator), torch.randn(32, 24, generator=generator)
    clusters = VocabClusters.of(weight, cluster_rows(weight))
    with_means = clusters.lower_log_sum_exp(hidden, weight, None)
    scored_only = clusters.lower_log_sum_exp(hidden, weight, 1e9)  # a cap this wide changes nothing but drops the means
    assert (with_means >= scored_only).all() and (with_means - scored_only).mean() > 0.01
    assert (with_means <= exact_lse(hidden, weight) + 1e-5).all()


def test_the_clusters_follow_a_head_that_changes_in_place(tiny_backbone):
    """The `full` method trains the head: the clusters' means must be the current rows', or the
    bound would be computed from rows that are gone."""
    weight = tiny_backbone.model.get_output_embeddings().weight
    hidden = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(2))
    before = tiny_backbone.vocab_clusters()
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(3.0)
        after = tiny_backbone.vocab_clusters()
        assert after is not before
        lower = after.lower_log_sum_exp(hidden, weight, tiny_backbone.softcap)
        assert (lower <= exact_lse(hidden, weight.detach()) + 1e-4).all()
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_a_large_vocabularys_clusters_are_kept_in_a_file_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setattr(vocab_bound, "CACHE_ROWS", 100)
    weight = torch.randn(800, 16, generator=torch.Generator().manual_seed(3))
    first = cached_assignment(weight, "abc", tmp_path)
    (kept,) = tmp_path.glob("vocab-clusters-abc-800.pt")
    monkeypatch.setattr(vocab_bound, "cluster_rows", lambda *_: pytest.fail("clustered again"))
    assert torch.equal(cached_assignment(weight, "abc", tmp_path), first)
    assert kept.exists() and first.dtype == torch.long


@pytest.mark.parametrize("exact_clusters", [1, 1000])
def test_a_backbones_bounds_are_at_least_its_log_probabilities_and_at_most_zero(any_backbone, monkeypatch, exact_clusters):
    monkeypatch.setattr(vocab_bound, "EXACT_CLUSTERS", exact_clusters)
    vocab = any_backbone.model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(4)
    hidden = 3 * torch.randn(6, any_backbone.model.config.hidden_size, generator=generator)
    tokens = torch.randint(vocab, (15,), generator=generator)
    parents = torch.arange(15) // 3
    with torch.no_grad():
        exact = any_backbone.token_log_probs(hidden, tokens, parents)
        bounds = any_backbone.token_log_prob_bounds(hidden, tokens, parents)
    assert (bounds >= exact - 1e-5).all() and (bounds <= 0).all()
    if exact_clusters == 1000:  # every cluster scored: the bound is the log-probability
        torch.testing.assert_close(bounds, exact, atol=1e-4, rtol=0)
    else:
        assert (bounds > exact + 1e-3).any()
