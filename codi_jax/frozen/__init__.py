"""The frozen encoders of a latent text-to-image model (VAE, CLIP text) and what they add to batches."""
