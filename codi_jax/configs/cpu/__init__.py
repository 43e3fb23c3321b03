"""CPU-scale configs: the demo's teacher, CoDi and baselines on 32x32 patches, and ``tiny_*`` for tests."""
