"""A logistic-regression head on fixed features (scikit-learn), folded into one weight row and
bias per label: what the `linear-probe` method answers with, and where `label_init: fit` starts a
per-label head (LP-FT: fit the head on the features first, then train prompt and head together).

Written on scikit-learn's LogisticRegression (lbfgs, L2) rather than by hand: it converges on
77-150 labels in seconds and needs no learning rate."""

from __future__ import annotations

import torch

C = 1.0  # inverse L2 strength, on standardized features (the best of 0.01-100 on SST-2: flat)
MAX_ITER = 1000
FIT_ROWS = 10_000  # rows fitted on at most: a seeded sample, stratified by label, of a larger training set


def missing_labels(labels: torch.Tensor, names: list[str]) -> list[str]:
    """The labels (by name) that no row holds: a head cannot be fitted for them."""
    return [names[k] for k in range(len(names)) if not (labels == k).any()]


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [L, H], bias [L]) fp32 with softmax(features @ weight.T + bias) the fitted
    probabilities. Fitted on standardized features and folded back to raw ones: W = A / s,
    b = c - W m for the fitted A, c and the rows' mean m and spread s. A binary fit's one vector w
    becomes the rows -w/2, +w/2 (softmax of those is its sigmoid). Every label needs a row."""
    from sklearn.linear_model import LogisticRegression

    x = features.double()
    mean, spread = x.mean(0), x.std(0, correction=0)
    spread = torch.where(spread > 1e-8, spread, torch.ones_like(spread))  # a constant feature carries nothing
    model = LogisticRegression(C=C, max_iter=MAX_ITER)
    model.fit(((x - mean) / spread).numpy(), labels.numpy())
    coef, intercept = torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_)
    if n_labels == 2:
        coef, intercept = torch.cat([-coef, coef]) / 2, torch.cat([-intercept, intercept]) / 2
    weight = coef / spread
    return weight.float(), (intercept - weight @ mean).float()
