"""The search space: YAML entries -> ``trial.suggest_*`` -> Hydra overrides.

Each entry's name is the config key it sets, so ``method.unsup_weight: {type: float,
low: 0.5, high: 6, log: true}`` becomes ``trial.suggest_float("method.unsup_weight",
0.5, 6, log=True)`` and then the override ``method.unsup_weight=<value>``. A list element
is addressed by its index: ``method.cls_scales.1``.
"""

from __future__ import annotations

from typing import Any, Mapping

from ssod.tuning.schema import ParamSpec

_CHOICE_TYPES = (bool, int, float, str, type(None))


def check_space(space: Mapping[str, ParamSpec]) -> None:
    """Raise ``ValueError`` naming every entry that cannot be sampled."""
    problems = []
    for name, spec in space.items():
        if spec.type in ("float", "int"):
            if spec.low is None or spec.high is None or spec.low > spec.high:
                problems.append(f"{name}: needs low <= high")
            elif spec.log and (spec.low <= 0 or spec.step is not None):
                problems.append(f"{name}: log needs low > 0 and no step")
            elif spec.type == "int" and (spec.low != int(spec.low) or spec.high != int(spec.high)):
                problems.append(f"{name}: int bounds must be whole numbers")
        elif spec.type == "categorical":
            if not spec.choices:
                problems.append(f"{name}: categorical needs choices")
            elif not all(isinstance(c, _CHOICE_TYPES) for c in spec.choices):
                problems.append(f"{name}: choices must be numbers, strings or booleans (a list element is set by index: key.0)")
        else:
            problems.append(f"{name}: type {spec.type!r} is not float, int or categorical")
    if problems:
        raise ValueError("invalid tune.space: " + "; ".join(problems))


def suggest(trial, space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Ask ``trial`` for every entry of ``space``; a retried trial gets its old values back."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.type == "float":
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)
        elif spec.type == "int":
            step = int(spec.step) if spec.step is not None else 1
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log, step=step)
        else:
            params[name] = trial.suggest_categorical(name, list(spec.choices))
    return params


def to_overrides(params: Mapping[str, Any]) -> list[str]:
    """``{"method.unsup_weight": 2.5}`` -> ``["method.unsup_weight=2.5"]``."""
    return [override(name, value) for name, value in params.items()]


def override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override syntax; strings are quoted, so any path is safe."""
    return f"{key}={hydra_value(value)}"


def hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"
