"""Evaluation results as a markdown table and ``results.json`` / ``results.md`` (written together, all or
nothing; earlier results are replaced only with ``overwrite``)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from codi_jax import atomic
from codi_jax.evaluation.scoring import Row
from codi_jax.sampling import few_step

EXTRA_COLUMNS = {
    "fid": ("FID", ".2f"),
    "kid": ("KID", ".4f"),
    "lpips": ("LPIPS", ".4f"),
    "lr_psnr": ("LR-consistency (dB)", ".2f"),
    "color_error": ("mean-colour error", ".2f"),
}


LOWPASS_SUFFIX = " + low-frequency consistency"


def _cell(value: float | None, spec: str) -> str:
    """A metric's table cell: "–" when missing or not applicable (None / NaN)."""
    return "–" if value is None or np.isnan(value) else format(value, spec)


def _spread_cell(row: Row, name: str, value: float | None, spec: str) -> str:
    """A cell with its spread over seeds (``mean ± sd``) when the row has one."""
    cell = _cell(value, spec)
    deviation = row.spread.get(name)
    return cell if deviation is None or cell == "–" else f"{cell} ± {format(deviation, spec)}"


def markdown_table(rows: list[Row]) -> str:
    extras = [name for name in EXTRA_COLUMNS if any(name in r.extra for r in rows)]
    head = ["method", "steps", "params trained", "PSNR (dB)", "SSIM", "SWD x1e3"]
    head += [EXTRA_COLUMNS[name][0] for name in extras] + ["ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        method = r.method + (LOWPASS_SUFFIX if r.lowpass_consistency else "")
        cells = [method, str(r.steps), f"{r.params_trained:,}"]
        cells += [
            _spread_cell(r, n, getattr(r, n), spec) for n, spec in (("psnr", ".2f"), ("ssim", ".4f"), ("swd", ".1f"))
        ]
        cells += [_spread_cell(r, n, r.extra.get(n), EXTRA_COLUMNS[n][1]) for n in extras]
        cells.append(f"{r.ms_per_image:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RESULT_FILES = ("results.json", "results.md")


def check_results_dir(out_dir: str, flag: str = "--out", overwrite: bool = False) -> None:
    """Refuses an output directory that already holds results, unless ``overwrite``."""
    few_step.check_out_dir(out_dir, RESULT_FILES, flag, overwrite=overwrite)


def results_files(
    rows: Sequence[Row], out_dir: str, header: str = "", meta: Mapping[str, Any] | None = None
) -> dict[str, bytes]:
    """``results.json`` (``{"rows": [...], **meta}``, samples left out) and ``results.md`` (the
    header and the table) as ``path -> bytes`` for ``atomic.write_files``."""
    table = [{k: v for k, v in dataclasses.asdict(r).items() if k != "samples"} for r in rows]
    markdown = (header + "\n\n" if header else "") + markdown_table(list(rows)) + "\n"
    json_path, md_path = (os.path.join(out_dir, name) for name in RESULT_FILES)
    return {
        json_path: json.dumps({"rows": table, **(meta or {})}, indent=2).encode(),
        md_path: markdown.encode(),
    }


def write_results(
    rows: Sequence[Row],
    out_dir: str,
    header: str = "",
    meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> tuple[str, str]:
    """Writes ``results.json`` and ``results.md`` together (all or nothing); earlier results are
    replaced only with ``overwrite``."""
    check_results_dir(out_dir, overwrite=overwrite)
    json_path, md_path = atomic.write_files(results_files(rows, out_dir, header, meta))
    return json_path, md_path
