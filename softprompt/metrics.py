"""Metrics. Classification ones are written out (a few lines of numpy) rather than pulling in
scikit-learn, a large dependency for four formulas; BLEU/chrF come from sacrebleu and ROUGE-L from
rouge-score, the reference implementations."""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np
import sacrebleu


def confusion(gold: list[int], pred: list[int], n_labels: int) -> np.ndarray:
    """[gold, predicted] counts."""
    matrix = np.zeros((n_labels, n_labels), dtype=int)
    np.add.at(matrix, (np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)), 1)
    return matrix


def classification_report(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    matrix = confusion(gold, pred, len(labels))
    true_pos = np.diag(matrix).astype(float)
    predicted = matrix.sum(0).astype(float)
    actual = matrix.sum(1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    present = actual > 0  # macro-F1 over labels that occur in the gold data
    return {
        "n": int(matrix.sum()),
        "accuracy": float(true_pos.sum() / max(1, matrix.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": labels,
        "confusion": matrix.tolist(),
    }


# -- generation ------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu), mean ROUGE-L F (rouge-score), exact match and token F1
    (SQuAD-style), each on a 0-100 scale; `names` picks which."""
    scores: dict[str, float] = {}
    if "bleu" in names:
        scores["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    if "chrf" in names:
        scores["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    if "rouge_l" in names:
        from rouge_score import rouge_scorer  # here: it imports nltk, 1.2 s of every command's start

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        values = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        scores["rouge_l"] = 100 * sum(values) / max(1, len(values))
    if "exact_match" in names:
        scores["exact_match"] = (
            100 * sum(map(exact_match, predictions, references)) / max(1, len(predictions))
        )
    if "f1" in names:
        scores["f1"] = 100 * sum(map(token_f1, predictions, references)) / max(1, len(predictions))
    return scores
