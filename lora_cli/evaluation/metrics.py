"""Classification metrics from a confusion matrix (numpy only).

``cm[i, j]`` counts samples of true class i predicted as class j. Precision of class j is
``cm[j, j] / cm[:, j].sum()``, recall of class i is ``cm[i, i] / cm[i, :].sum()``; an
undefined ratio (no predictions of / no samples of the class) counts as 0. Macro-F1
averages F1 over the classes that occur in the labels or the predictions (scikit-learn's
default), so a 101-class head evaluated on a 10-image subset is not dragged down by
91 classes that were never in play.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """precision, recall, f1 and support per class."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def macro_f1(cm: np.ndarray) -> float:
    scores = per_class_scores(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(scores["f1"][present].mean()) if present.any() else 0.0


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of samples whose label is among the k highest logits."""
    if len(labels) == 0:
        return 0.0
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def most_confused(cm: np.ndarray, id2label: Mapping[int, str], n: int = 10) -> list[dict]:
    """The n largest off-diagonal cells: which true class is taken for which, how often."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    support = cm.sum(axis=1)
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        count = int(off[i, j])
        if count == 0:
            break
        pairs.append(
            {
                "true": id2label.get(i, str(i)),
                "predicted": id2label.get(j, str(j)),
                "count": count,
                "rate": count / int(support[i]),
            }
        )
    return pairs


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits), computed stably."""
    if len(labels) == 0:
        return float("nan")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float((log_z - shifted[np.arange(len(labels)), labels]).mean())
