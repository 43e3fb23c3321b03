"""Stable Diffusion 3 / 3.5 transformers' configs (their transformer/config.json as our ``DiT`` fields)
and SD3's text context, written out for benchmarks that build SD3-shaped models without weights."""

_SD3 = dict(
    kind="dit",
    in_channels=16,
    out_channels=16,
    patch_size=2,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    sample_size=128,
)
# SD3-medium / SD3.5-medium / SD3.5-large transformers. The diffusers counts: SD3Transformer2DModel(**config)
# built on torch's meta device.
SD3_MEDIUM = dict(_SD3, num_layers=24, num_attention_heads=24, pos_embed_max_size=192)
SD35_MEDIUM = dict(
    _SD3,
    num_layers=24,
    num_attention_heads=24,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
SD35_LARGE = dict(_SD3, num_layers=38, num_attention_heads=38, pos_embed_max_size=192, qk_norm="rms_norm")
SD3_MEDIUM_PARAMS = 2_028_328_000
SD35_MEDIUM_PARAMS = 2_243_171_520
SD35_LARGE_PARAMS = 8_056_627_520
# The joint-attention context: 77 CLIP tokens (CLIP-L and CLIP-G's penultimate states side by side, 768 +
# 1280, zero-padded to T5's width) then 256 T5-XXL tokens, all 4096 wide; the pooled projections
# (CLIP-L's 768 + CLIP-G's 1280) are SD3_POOLED wide.
SD3_TEXT = (77 + 256, 4096)
SD3_POOLED = 2048
# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json as our schedule section
# (FlowMatchEulerDiscreteScheduler: ``convert`` writes it so; the transformer predicts the velocity, 'v').
SD3_SCHEDULE = dict(kind="flow", shift=3.0, num_train_timesteps=1000)
