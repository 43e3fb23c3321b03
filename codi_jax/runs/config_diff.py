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


def differences(
    first: ml_collections.ConfigDict | Mapping,
    second: ml_collections.ConfigDict | Mapping,
    sections: Sequence[str],
    *,
    names: tuple[str, str] = ("checkpoint", "config"),
    only_first_keys: bool = False,
) -> list[str]:
    """``section.field: a (first) vs b (second)`` for every field of ``sections`` that differs.

    ``sections`` names whole sections (``"model"``) or single fields (``"task.name"``). Lists and
    tuples compare equal (saved configs are complete: ``config_upgrade`` fills fields added since
    they were written). ``only_first_keys`` compares just the fields the first config sets (a user's
    partial section against a complete saved one).
    """
    first, second = as_dict(first), as_dict(second)
    diffs = []
    for entry in sections:
        section, _, field = entry.partition(".")
        a, b = first.get(section) or {}, second.get(section) or {}
        if field:
            keys = [field]
        elif only_first_keys:
            keys = sorted(first.get(section) or {})
        else:
            keys = sorted(set(a) | set(b))
        diffs += [
            f"{section}.{key}: {a.get(key)!r} ({names[0]}) vs {b.get(key)!r} ({names[1]})"
            for key in keys
            if _normalise(a.get(key)) != _normalise(b.get(key))
        ]
    return diffs


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value
