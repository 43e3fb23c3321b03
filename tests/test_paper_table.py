"""The paper table's verdicts: a gap counts only beyond twice the larger seed spread."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import paper_table  # noqa: E402

from codi_jax.evaluation import scoring  # noqa: E402


def _row(psnr: float, swd: float, lpips: float, sd: float) -> scoring.Row:
    spread = {"psnr": sd, "swd": 10 * sd, "lpips": sd / 100}
    return scoring.Row("m", 4, psnr, 0.5, swd, 1.0, 1, np.zeros((1, 2, 2, 3)), {"lpips": lpips}, seeds=3, spread=spread)


def test_judge_reads_each_metric_against_twice_the_spread() -> None:
    base = _row(24.0, 120.0, 0.250, sd=0.1)
    verdict, detail = paper_table.judge(_row(24.5, 100.0, 0.240, sd=0.1), base)  # gaps 0.5, 20, 0.01 > 0.2, 2, 0.002
    assert verdict == "**reproduced**" and detail.count("(better)") == 3
    verdict, detail = paper_table.judge(_row(24.15, 121.0, 0.260, sd=0.1), base)  # within, within, worse
    assert verdict == "**not reproduced**"
    assert "PSNR 24.15 vs 24.00 (level)" in detail and "(worse)" in detail and "SWD 121.0 vs 120.0 (level)" in detail
    verdict, _ = paper_table.judge(_row(24.5, 130.0, 0.250, sd=0.1), base)
    assert verdict == "**partly**"
    # One seed (no spread): any gap counts.
    verdict, detail = paper_table.judge(_row(24.01, 119.9, 0.2499, sd=0.0), _row(24.0, 120.0, 0.25, sd=0.0))
    assert verdict == "**reproduced**", detail
