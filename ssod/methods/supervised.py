"""Supervised training: the labeled images only (the baseline every method is measured against)."""

from __future__ import annotations

from ssod.methods.base import Method


class Supervised(Method):
    """No unlabeled batch is ever drawn; the EMA teacher still follows (and is evaluated)."""

    name = "supervised"
    title = "Supervised training"
    needs_unlabeled = False
