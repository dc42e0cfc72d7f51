"""Whether a classification run is learning: its loss and accuracy against its task's chance level.

A learning rate tuned for one backbone can collapse another without any error: the loss
sits at ``ln(num_classes)`` (what a uniform guess scores) and the accuracy at one class in
``num_classes``, epoch after epoch. These checks turn that into one line the user can act on;
``train`` (a callback) and ``eval`` (a finished run) both use them. Generative tasks have no
chance level here and are not checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# a later epoch's loss above the one before by this fraction (and by RISE_MIN) counts as rising,
# while it is still at least RISE_FLOOR of chance: a blip of a run already well below chance (a
# quickstart at 0.755 -> 0.909 that ends at eval loss 0.16) is noise, not a collapse
RISE_FRACTION = 0.10
RISE_MIN = 0.05
RISE_FLOOR = 0.5


def chance_loss(num_classes: int) -> float:
    """The cross-entropy of a uniform guess over ``num_classes``: ``ln(num_classes)``."""
    return math.log(num_classes)


def chance_accuracy(num_classes: int, majority: float | None = None) -> float:
    """The accuracy of the best constant guess: one class in ``num_classes``, or the share of the
    most frequent class when it is known (an unbalanced evaluation set)."""
    return max(1.0 / num_classes, majority or 0.0)


def at_chance(accuracy: float, num_classes: int, majority: float | None = None) -> bool:
    """Whether ``accuracy`` is within noise of chance: at most chance plus half of it, capped at 5 points
    (0.15 for ten balanced classes, 0.55 for two)."""
    chance = chance_accuracy(num_classes, majority)
    return accuracy <= chance + min(0.05, chance / 2)


def epoch_loss(losses: Sequence[float]) -> float | None:
    """One epoch's training loss from the losses logged during it: the mean of its later half
    (the first steps of an epoch still carry the one before)."""
    if not losses:
        return None
    half = list(losses)[len(losses) // 2:]
    return sum(half) / len(half)


def loss_evidence(epoch: int, loss: float, previous: float | None, num_classes: int) -> str | None:
    """Why the training loss of ``epoch`` (1-based, its :func:`epoch_loss`) says the run is not
    learning, or None: at or above chance, or risen since the epoch before to at least half of it."""
    chance = chance_loss(num_classes)
    if loss >= chance:
        return (f"training loss {loss:.3f} after epoch {epoch} is at or above chance level "
                f"(ln {num_classes} = {chance:.3f})")
    rose = previous is not None and loss > previous * (1 + RISE_FRACTION) and loss - previous > RISE_MIN
    if rose and loss >= RISE_FLOOR * chance:
        return f"training loss rose from {previous:.3f} to {loss:.3f} in epoch {epoch}"
    return None


def accuracy_evidence(accuracy: float, num_classes: int, majority: float | None = None, when: str = "") -> str | None:
    """Why an evaluation accuracy says the run is not learning (it is at chance), or None."""
    if not at_chance(accuracy, num_classes, majority):
        return None
    where = f" {when}" if when else ""
    return (f"evaluation accuracy {accuracy:.3f}{where} is at chance level "
            f"({chance_accuracy(num_classes, majority):.3f} for {num_classes} classes)")


def not_learning_line(evidence: str, learning_rate: float | None, hint: str | None = None) -> str:
    """The one warning line: what was seen, the likely cause and the fix. ``hint`` names a rate
    known to work for this model (a shipped recipe's)."""
    rate = f" {learning_rate:g}" if learning_rate is not None else ""
    fix = f"lower it ({hint}) or search one with `loracli tune`" if hint else \
        "lower it (try 10x lower) or search one with `loracli tune`"
    return (f"this run is not learning: {evidence}. The learning rate{rate} is likely too high for this "
            f"backbone: {fix}")
