"""SD3's T5 text encoder and tokenizer against transformers / diffusers (PyTorch).

Tiny random ``T5EncoderModel``s (``gated-gelu`` as T5 v1.1 / SD3, and ``relu``) are saved with
``save_pretrained`` and read back with ``load_t5_encoder``; sequences of 20 tokens with 8 buckets
and max distance 16 reach the log-spaced and the clamped buckets. The tokenizer is a Unigram
trained here on a tiny corpus (no download), saved by transformers' ``T5TokenizerFast``, and also
rewritten in transformers 4.x's layout (``Replace`` normaliser, lone ``Metaspace``), as SD3 ships it.
"""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from codi_jax.frozen.t5_text import encode_t5_prompts, load_t5_text, zero_t5_context  # noqa: E402
from codi_jax.models.t5 import (  # noqa: E402
    T5Encoder,
    UnsupportedT5Config,
    load_t5_encoder,
    relative_position_bucket,
    t5_encoder_params,
    t5_from_config,
    t5_param_memory,
)
from codi_jax.models.t5_tokenizer import load_t5_tokenizer  # noqa: E402

MAX_LENGTH = 24
CORPUS = [
    "a photo of a cat sitting on the mat",
    "The quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on the moon, digital art",
    "hello world 123 4.56!",
    "a watercolor painting of a lighthouse at dusk",
]
PROMPTS = [
    "a photo of a cat",
    "  extra   whitespace\tand\nnew\r\nlines  ",
    "",
    "The Quick Brown Fox! 123",
    "unseen zqx words ÿ 日本語 text",
    "</s> inside <extra_id_1> and <pad>x",
    "a horse " * 20,  # truncated
]


def _tiny_config(feed_forward_proj: str, vocab_size: int, num_layers: int) -> transformers.T5Config:
    return transformers.T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj=feed_forward_proj,
    )


@pytest.fixture(scope="module", params=[("gated-gelu", 96, 3), ("relu", 72, 2)], ids=["gated-gelu", "relu"])
def encoders(request, tmp_path_factory):
    """(transformers model, folder, our model, our params); norm weights moved away from 1."""
    torch.manual_seed(0)
    reference = transformers.T5EncoderModel(_tiny_config(*request.param)).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "layer_norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    directory = str(tmp_path_factory.mktemp(f"t5_{request.param[0]}"))
    reference.save_pretrained(directory)
    model, params = load_t5_encoder(directory)
    return reference, directory, model, params


def _assert_close(ours, reference: np.ndarray, what: str, rtol: float = 1e-5) -> float:
    error = float(np.max(np.abs(np.asarray(ours, np.float64) - reference)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    print(f"{what}: max abs err {error:.3g}, reference scale {scale:.3g}")
    assert error <= rtol * scale, f"{what}: max abs err {error} > {rtol} * {scale}"
    return error


def _reference(reference, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    with torch.no_grad():
        torch_mask = None if mask is None else torch.from_numpy(mask)
        return reference(torch.from_numpy(ids), attention_mask=torch_mask).last_hidden_state.numpy()


def test_encoder_matches_transformers(encoders) -> None:
    reference, _, model, params = encoders
    rng = np.random.default_rng(0)
    mask = np.ones((2, 20), np.int64)
    mask[1, 13:] = 0  # right padding
    mask[0, :3] = 0  # left padding
    for ids, m in [
        (rng.integers(0, model.vocab_size, (2, 20)), None),
        (rng.integers(0, model.vocab_size, (2, 20)), mask),
        (rng.integers(0, model.vocab_size, (2, 13)), None),
    ]:
        ours = model.apply({"params": params}, jnp.asarray(ids), None if m is None else jnp.asarray(m))
        label = f"{model.feed_forward_proj} {ids.shape} {'mask' if m is not None else 'no mask'}"
        _assert_close(ours, _reference(reference, ids, m), label)


@pytest.mark.parametrize("num_buckets,max_distance", [(8, 16), (32, 128), (10, 20)])
def test_relative_position_buckets_match_transformers(num_buckets: int, max_distance: int) -> None:
    """Bucket tables equal transformers' for every offset up to +-600 (SD3: 32 buckets, 128 distance)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    theirs = T5Attention._relative_position_bucket(relative, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(relative_position_bucket(600, 600, num_buckets, max_distance), theirs)


def test_bfloat16_forward_is_close(encoders) -> None:
    reference, _, model, params = encoders
    ids = np.random.default_rng(2).integers(0, model.vocab_size, (2, 20))
    ours = model.clone(dtype=jnp.bfloat16).apply({"params": params}, jnp.asarray(ids))
    assert ours.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(ours)))
    _assert_close(ours.astype(jnp.float32), _reference(reference, ids, None), f"{model.feed_forward_proj} bf16", 5e-2)


def test_tied_embedding_names(encoders) -> None:
    """``shared.weight`` and its tie ``encoder.embed_tokens.weight``: either alone, or both (equal)."""
    reference, _, model, params = encoders
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    shared = state.pop("shared.weight")
    state.pop("encoder.embed_tokens.weight", None)
    for embeddings in (
        {"encoder.embed_tokens.weight": shared},
        {"shared.weight": shared, "encoder.embed_tokens.weight": shared.copy()},
    ):
        converted = t5_encoder_params({**state, **embeddings}, model)
        np.testing.assert_array_equal(converted["shared"]["embedding"], params["shared"]["embedding"])
    with pytest.raises(ValueError, match="differ"):
        t5_encoder_params({**state, "shared.weight": shared, "encoder.embed_tokens.weight": shared + 1}, model)
    with pytest.raises(ValueError, match=r"shared\.weight"):
        t5_encoder_params(state, model)


def test_conversion_errors_name_the_tensor(encoders) -> None:
    reference, _, model, _ = encoders
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    leftover = {**state, "decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((32, 32), np.float32)}
    with pytest.raises(ValueError, match=r"1 T5 tensors have no counterpart.*decoder\.block\.0\.layer\.0"):
        t5_encoder_params(leftover, model)
    missing = {k: v for k, v in state.items() if k != "encoder.block.1.layer.1.layer_norm.weight"}
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.1\.layer_norm\.weight"):
        t5_encoder_params(missing, model)
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        t5_encoder_params({**state, name: np.zeros((9, 4), np.float32)}, model)


def test_sharded_pipeline_folder(encoders, tmp_path) -> None:
    """An SD3 pipeline folder's sharded ``text_encoder_3/`` (safetensors index) loads to the same params."""
    reference, _, model, params = encoders
    reference.save_pretrained(str(tmp_path / "text_encoder_3"), max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "text_encoder_3" / "model.safetensors.index.json")
    loaded_model, loaded = load_t5_encoder(str(tmp_path))
    assert loaded_model == model
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_config_refuses_unsupported_fields(encoders) -> None:
    config = json.load(open(os.path.join(encoders[1], "config.json")))
    assert t5_from_config(config) == encoders[2]
    gated = config["feed_forward_proj"] == "gated-gelu"
    for field, value in [
        ("feed_forward_proj", "gated-silu"),
        ("dense_act_fn", "relu" if gated else "gelu_new"),
        ("is_gated_act", not gated),
        ("architectures", ["T5ForConditionalGeneration"]),
        ("model_type", "mt5"),
        ("is_decoder", True),
        ("relative_attention_num_buckets", 2),
        ("layer_norm_epsilon", None),
        ("rope_theta", 10000.0),
    ]:
        with pytest.raises(UnsupportedT5Config, match=field) as error:
            t5_from_config({**config, field: value})
        assert "\n" not in str(error.value)


def test_t5_xxl_parameter_memory() -> None:
    """T5-XXL's encoder (SD3's text_encoder_3) from shapes only: 4.76e9 parameters, 9.5 GB in bf16."""
    xxl = T5Encoder(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"
    )
    count, nbytes = t5_param_memory(xxl)
    print(f"T5-XXL encoder: {count:,} params, bf16 {nbytes / 1e9:.2f} GB ({nbytes / 2**30:.2f} GiB)")
    assert count == 4_762_310_656 and nbytes == 2 * count


# ---------------------------------------------------------------- tokenizer


def _legacy_layout(folder: str) -> None:
    """Rewrites a saved tokenizer the way transformers 4.x saved SD3's tokenizer_3 (normaliser and
    pre-tokenizer that transformers 5 replaces; AddedToken dicts and extra fields in the config)."""
    file = os.path.join(folder, "tokenizer.json")
    spec = json.load(open(file, encoding="utf-8"))
    replace = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
    spec["normalizer"] = {"type": "Sequence", "normalizers": [replace]}
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
    json.dump(spec, open(file, "w", encoding="utf-8"))
    config_file = os.path.join(folder, "tokenizer_config.json")
    config = json.load(open(config_file))
    extra = config.pop("extra_special_tokens")
    token = lambda content: dict(
        __type="AddedToken", content=content, lstrip=False, normalized=False, rstrip=False, single_word=False
    )
    config.update(
        additional_special_tokens=extra, eos_token=token("</s>"), legacy=True, add_prefix_space=True, sp_model_kwargs={}
    )
    json.dump(config, open(config_file, "w"))


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict[str, str]:
    backend = tokenizers.Tokenizer(tokenizers.models.Unigram())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    trainer = tokenizers.trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    vocab = [tuple(piece) for piece in json.loads(backend.to_str())["model"]["vocab"]]
    root = tmp_path_factory.mktemp("t5_tokenizers")
    folders = {}
    for layout in ("saved", "legacy"):
        folders[layout] = str(root / layout)
        built = transformers.T5TokenizerFast(vocab=vocab, extra_ids=4, model_max_length=MAX_LENGTH)
        built.save_pretrained(folders[layout])
    _legacy_layout(folders["legacy"])
    return folders


@pytest.mark.parametrize("layout", ["saved", "legacy"])
def test_tokenizer_matches_transformers(tokenizer_folders, layout: str) -> None:
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_folders[layout])
    ours = load_t5_tokenizer(tokenizer_folders[layout])
    assert ours.model_max_length == MAX_LENGTH and ours.pad_token_id == reference.pad_token_id == 0
    for max_length in (MAX_LENGTH, 8):
        expected = reference(PROMPTS, padding="max_length", max_length=max_length, truncation=True)
        got = ours(PROMPTS, max_length=max_length)
        for prompt, want, have in zip(PROMPTS, expected.input_ids, got.input_ids):
            assert have.tolist() == want, f"{layout} {max_length}: {prompt!r}"
        np.testing.assert_array_equal(got.attention_mask, np.asarray(expected.attention_mask))
    for prompt in PROMPTS:
        assert ours.encode(prompt) == reference(prompt).input_ids


def test_sd3_prompt_embeds_match_diffusers(encoders, tokenizer_folders) -> None:
    """``encode_t5_prompts`` = diffusers' ``StableDiffusion3Pipeline._get_t5_prompt_embeds`` (no mask)."""
    pipeline_module = pytest.importorskip("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    reference, folder, model, _ = encoders
    text = load_t5_text(folder, tokenizer_folders["legacy"])
    assert text.tokenizer.backend.get_vocab_size() <= model.vocab_size
    fake = types.SimpleNamespace(
        text_encoder=reference,
        text_encoder_3=reference,
        tokenizer_3=transformers.AutoTokenizer.from_pretrained(tokenizer_folders["legacy"]),
        tokenizer_max_length=77,
        _execution_device=torch.device("cpu"),
    )
    get_embeds = pipeline_module.StableDiffusion3Pipeline._get_t5_prompt_embeds
    for max_sequence_length in (20, 6):
        with torch.no_grad():
            expected = get_embeds(fake, PROMPTS, max_sequence_length=max_sequence_length).numpy()
        ours = encode_t5_prompts(text, PROMPTS, max_sequence_length)
        assert ours.shape == expected.shape == (len(PROMPTS), max_sequence_length, model.d_model)
        _assert_close(ours, expected, f"SD3 T5 prompt_embeds L={max_sequence_length}")
    assert zero_t5_context(2, 64, 20).shape == (2, 20, 64)
