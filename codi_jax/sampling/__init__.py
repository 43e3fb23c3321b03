"""Sampling: pure samplers, the conditional sampler of a run, guidance, few-step sampling of images."""
