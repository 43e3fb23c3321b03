"""The one comparison of configs: which fields differ between two (saved or current) configs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


def as_dict(config: ml_collections.ConfigDict | Mapping) -> dict:
    """A plain JSON-able dict of a ConfigDict or mapping (tuples become lists, as when saved)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def flat(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"section.field": value}`` for every leaf of a nested mapping (sub-sections recursed)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):  # an empty section has no fields
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def covered(key: str, names: Sequence[str]) -> bool:
    """Whether the dotted ``key`` is one of ``names`` or lies under one of them."""
    return any(key == name or key.startswith(name + ".") for name in names)


def differences(
    first: ml_collections.ConfigDict | Mapping,
    second: ml_collections.ConfigDict | Mapping,
    sections: Sequence[str],
    *,
    names: tuple[str, str] = ("checkpoint", "config"),
    only_first_keys: bool = False,
    exclude: Sequence[str] = (),
) -> list[str]:
    """``section.field: a (first) vs b (second)`` for every field under ``sections`` that differs.

    ``sections`` names whole sections (``"model"``), single fields (``"task.name"``) or top-level
    fields (``"seed"``); ``exclude`` names fields (or sections) under them left out. Lists and
    tuples compare equal (saved configs are complete: ``config_upgrade`` fills fields added since
    they were written). ``only_first_keys`` compares just the fields the first config sets (a user's
    partial section against a complete saved one).
    """
    a, b = flat(as_dict(first)), flat(as_dict(second))
    keys = a if only_first_keys else {**a, **b}
    chosen = [key for key in sorted(keys) if covered(key, sections) and not covered(key, exclude)]
    return [
        f"{key}: {a.get(key)!r} ({names[0]}) vs {b.get(key)!r} ({names[1]})"
        for key in chosen
        if _normalise(a.get(key)) != _normalise(b.get(key))
    ]


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value
