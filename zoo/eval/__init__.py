"""Evaluation helpers: a digit classifier to judge generated digits (more metrics live beside it)."""

from zoo.eval.digits_classifier import DigitsClassifier, agreement, get_classifier

__all__ = ["DigitsClassifier", "agreement", "get_classifier"]
