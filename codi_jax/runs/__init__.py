"""A run's workdir: Orbax checkpoints, restoring weights, the resolved config and config comparison."""
