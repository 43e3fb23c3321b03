"""diffusers / PyTorch in and out: converting a diffusers folder, exporting a run, weight name maps."""
