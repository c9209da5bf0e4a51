"""Scores on the held-out split: exact match of a generated answer, the one comparison of the ``heldout``
stage and of lm-eval's ``ft_quickstart_heldout`` task (``eval/tasks/utils.py``), and a classifier's accuracy."""

from __future__ import annotations


def normalize(text: str) -> str:
    """Compare answers ignoring surrounding space and a trailing full stop."""
    return " ".join(text.strip().rstrip(".").split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    """The fraction of ``predictions`` that match their reference (:func:`exact_match`)."""
    return sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == label for p, label in zip(predictions, labels, strict=True)) / len(labels)
