"""Stable Diffusion XL base's UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the
fields our converter reads), written out for benchmarks that build SDXL-shaped models without weights."""

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # diffusers' name: heads per level (64 channels each)
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}
SDXL_TEXT = (77, 2048)  # the two encoders' penultimate states, concatenated (768 + 1280)
SDXL_PARAMS = 2_567_463_684  # diffusers' parameter count of this UNet
