"""A lower bound on the vocabulary's log-sum-exp from a few percent of the output projection.

The pruned label search (`classify.label_answers`) feeds a trie node to learn its children's
log-probabilities, log p_c = x_c - LSE(x) over the whole vocabulary, and most of what it learns
only rules labels out. For that an upper bound suffices: x_c - L for any L <= LSE(x). Computing
LSE exactly is the cost: on Gemma 3 (262,144 rows) it was 8.2 of the 14.2 s that 48 Banking77 rows
took, more than feeding the nodes through the model.

The bound: the output rows are grouped once per model into clusters (k-means on their vectors,
`cluster_rows`, cached on disk by the model's fingerprint). At a position, the clusters whose mean
row scores highest are scored exactly (`EXACT_CLUSTERS` of `CLUSTERS`, about 3% of the rows); every
other cluster C adds |C| exp(mean of its logits), a lower bound on its sum of exp(logit) (Jensen:
exp is convex), and the mean of its logits is the position's product with C's mean row. Every term
is at most what the exact sum has, so the result is a lower bound whatever the clustering; the
clustering only decides how close it is (measured on Banking77's trie nodes, Gemma 3, untrained
prompt: 0.2 nats below the exact value at the median). A soft-capped model keeps the exact clusters
only: the mean of capped logits is not the capped mean.

Hand-written: the maximum-inner-product libraries that cluster a vocabulary (FAISS, ScaNN) answer
nearest neighbours, approximately; this needs a guaranteed bound on a sum, in plain PyTorch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .vocab_loss import capped_logits

CLUSTERS = 1024  # at most; a small vocabulary gets one cluster per 16 rows
EXACT_CLUSTERS = 32  # scored exactly at each position: the best-scoring by their mean row
KMEANS_SAMPLE = 32  # rows per cluster that k-means fits its centres on
KMEANS_STEPS = 6
ASSIGN_ROWS = 16384  # rows assigned to their nearest centre at once ([rows, clusters] distances)
CACHE_ROWS = 32768  # a vocabulary this large keeps its clusters in a file


@dataclass
class VocabClusters:
    """The output rows in clusters: `order` lists the row ids cluster after cluster, cluster k's
    rows are `order[starts[k]:starts[k + 1]]`; `means` [K, H] and `log_sizes` [K]."""

    order: torch.Tensor
    starts: list[int]
    means: torch.Tensor
    log_sizes: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, assignment: torch.Tensor) -> VocabClusters:
        """The clusters that `assignment` ([V] cluster per row, clusters numbered from 0) makes of `weight`'s rows."""
        k = int(assignment.max()) + 1
        sizes = torch.bincount(assignment, minlength=k)
        means = torch.zeros(k, weight.shape[1], dtype=torch.float32, device=weight.device)
        means.index_add_(0, assignment.to(weight.device), weight.detach().float())
        means /= sizes.clamp(min=1).to(means)[:, None]
        starts = [0, *torch.cumsum(sizes, 0).tolist()]
        log_sizes = sizes.float().log().to(weight.device)  # an empty cluster: log 0 = -inf, adds nothing
        return cls(torch.argsort(assignment, stable=True).to(weight.device), starts, means, log_sizes)

    def lower_log_sum_exp(
        self, hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N] a lower bound on each position's log-sum-exp over the whole vocabulary ([N, H] hidden
        states, [V, H] output projection; logits as `vocab_loss` forms them)."""
        hidden = hidden.detach().float()
        centre = hidden @ self.means.T  # [N, K]: each cluster's mean logit, bias aside
        if bias is not None:  # a cluster's mean logit has its rows' mean bias in it
            centre += self.mean_bias(bias)
        exact = centre.topk(min(EXACT_CLUSTERS, centre.shape[1]), dim=1).indices  # [N, E]
        total = torch.full((hidden.shape[0],), -torch.inf, device=hidden.device)
        picked = torch.zeros_like(centre, dtype=torch.bool).scatter_(1, exact, True)
        for cluster in exact.unique().tolist():
            at = picked[:, cluster].nonzero().squeeze(1)
            ids = self.order[self.starts[cluster] : self.starts[cluster + 1]]
            logits = capped_logits(hidden[at], weight[ids], softcap, None if bias is None else bias[ids])
            total[at] = torch.logaddexp(total[at], logits.logsumexp(-1))
        if softcap:
            return total
        rest = (centre + self.log_sizes).masked_fill_(picked, -torch.inf).logsumexp(-1)
        return torch.logaddexp(total, rest)

    def mean_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """[K] each cluster's mean bias."""
        sizes = torch.tensor(self.starts[1:]) - torch.tensor(self.starts[:-1])
        cluster = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(bias.device)
        sums = torch.zeros(len(sizes), device=bias.device).index_add_(0, cluster, bias.detach().float()[self.order])
        return sums / sizes.clamp(min=1).to(sums)


def cluster_rows(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[V] a cluster per output row: k-means (squared distance) fitted on a sample of the rows, then
    every row to its nearest centre. About 5 s for Gemma 3's 262,144 rows on 2 cores."""
    rows = weight.detach().float()
    k = max(1, min(CLUSTERS, rows.shape[0] // 16))
    generator = torch.Generator().manual_seed(seed)
    sample = rows[torch.randperm(rows.shape[0], generator=generator)[: k * KMEANS_SAMPLE].to(rows.device)]
    centres = sample[:k].clone()
    for _ in range(KMEANS_STEPS):
        nearest = _nearest(sample, centres)
        sums = torch.zeros_like(centres).index_add_(0, nearest, sample)
        counts = torch.bincount(nearest, minlength=k)
        centres = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None].to(sums), centres)
    return torch.cat([_nearest(rows[start : start + ASSIGN_ROWS], centres) for start in range(0, rows.shape[0], ASSIGN_ROWS)])


def _nearest(rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return (rows @ centres.T - 0.5 * (centres * centres).sum(1)).argmax(1)


def cached_assignment(weight: torch.Tensor, fingerprint: str, folder: Path) -> torch.Tensor:
    """`cluster_rows(weight)`, kept in `folder` under the model's fingerprint: k-means runs once per
    model and machine. Any assignment gives a valid bound, so a stale file costs tightness only. A
    vocabulary under `CACHE_ROWS` (the tests' tiny models) is clustered in well under a second: no file."""
    if weight.shape[0] < CACHE_ROWS:
        return cluster_rows(weight)
    path = folder / f"vocab-clusters-{fingerprint}-{weight.shape[0]}.pt"
    if path.exists():
        assignment = torch.load(path, weights_only=True)
        if assignment.shape == (weight.shape[0],):
            return assignment.long()
    assignment = cluster_rows(weight)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(assignment.cpu().to(torch.int16 if int(assignment.max()) < 2**15 else torch.int64), partial)
    os.replace(partial, path)
    return assignment.long()
