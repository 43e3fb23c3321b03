"""The paper's pixel-space settings (DF2K 256 px teacher, real-world SR, ImageNet inpainting)."""
