"""Training methods, one file each; ``method.name`` chooses one from ``METHODS``.

Adding a method: a file here with a ``Method`` subclass (its ``pseudo_labels``, and a
polisher if it has one), its entry in ``METHODS``, and a YAML in ``conf/method/``.
"""

from __future__ import annotations

from ssod.config import MethodConfig
from ssod.methods.base import Method
from ssod.methods.polish_teacher import PolishTeacher
from ssod.methods.soft_teacher import SoftTeacher
from ssod.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "soft_teacher": SoftTeacher,
    "polish_teacher": PolishTeacher,
}


def build_method(cfg: MethodConfig) -> Method:
    """The method ``cfg.name`` names, with its settings from ``cfg``."""
    if cfg.name not in METHODS:
        raise ValueError(f"method.name={cfg.name!r}: choose one of {sorted(METHODS)}")
    if cfg.pseudo_labels not in ("teacher", "oracle"):
        raise ValueError(f"method.pseudo_labels={cfg.pseudo_labels!r}: choose teacher or oracle")
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "Method", "build_method"]
