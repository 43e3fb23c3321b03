"""Evaluation: held-out sets, sampling and scoring them, tables."""
