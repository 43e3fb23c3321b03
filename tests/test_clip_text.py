"""CLIP text encoder and tokenizer against transformers (PyTorch): equal hidden states, equal token ids.

Tiny random transformers models (``quick_gelu`` as SD 1.x, ``gelu`` as SD 2.x) are saved with
``save_pretrained`` and read back with ``load_clip_text``. The tokenizer's vocabulary and merges
are learned here from a tiny corpus (no download); transformers' ``CLIPTokenizer`` is built from
those files, saved, and compared with ours on varied prompts for eos- and ``!``-padded folders.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codi_jax.models.clip_text import (  # noqa: E402
    UnsupportedCLIPConfig,
    clip_text_from_config,
    clip_text_params_from_state_dict,
    load_clip_text,
)
from codi_jax.models.clip_tokenizer import load_clip_tokenizer  # noqa: E402
from tests import tiny_sd  # noqa: E402

MAX_LENGTH = 48  # model_max_length of the tokenizers and max_position_embeddings of the encoders
PROMPTS = [
    "a photo of a cat",
    "The Quick Brown Fox Jumps Over The Lazy Dog!",
    "  extra   whitespace\tand\nnew\r\nlines  ",
    "",
    "numbers 123 and 4.56, 7,890 in 2024",
    "wow!!! ... ?!? (the) [cat] {dog} -- a_b",
    "it's they're I'M you'll he'd don't 'quoted' \"double\"",
    "café naïve résumé Ångström",
    "cafe\u0301 decomposed accent",
    "ΟΔΟΣ Σίσυφος ΑΣ",
    "emoji 🐱 and 日本語 text",
    "İstanbul STRASSE straße ǅ",
    "mixed\u00a0nbsp\u3000ideographic\u2009thin\x1cunit-separator",
    "hello!world? ?<|endoftext|>x",
    "<|ENDOFTEXT|>. <|startoftext|>a",
    "x<|STARTOFTEXT|>'s <|endoftext|>",
]
LONG_PROMPT = "the cat sat on the mat " * 12
PROMPTS.append(LONG_PROMPT)


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory) -> tuple[str, str, int]:
    return tiny_sd.write_bpe_files(str(tmp_path_factory.mktemp("bpe")), 80)


# ---------------------------------------------------------------- tokenizer


def _legacy_folder(directory, vocab_file: str, merges_file: str, pad_token: str) -> None:
    """An SD-hub-style folder (vocab.json, merges.txt, AddedToken dicts with normalized=True)."""
    os.makedirs(directory)
    for source in (vocab_file, merges_file):
        with open(source, encoding="utf-8") as f, open(directory / os.path.basename(source), "w") as g:
            g.write(f.read())
    token = lambda content: dict(content=content, lstrip=False, normalized=True, rstrip=False, single_word=False)
    specials = dict(
        bos_token=token("<|startoftext|>"), eos_token=token("<|endoftext|>"), unk_token=token("<|endoftext|>")
    )
    config = {k: {"__type": "AddedToken", **v} for k, v in specials.items()}
    config.update(model_max_length=MAX_LENGTH, pad_token=pad_token, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    with open(directory / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    with open(directory / "special_tokens_map.json", "w") as f:
        json.dump({**specials, "pad_token": pad_token}, f)


@pytest.fixture(scope="module")
def tokenizer_folders(bpe_files, tmp_path_factory) -> dict[str, str]:
    """name -> a model folder whose tokenizer/ subfolder holds the tokenizer files."""
    vocab_file, merges_file, _ = bpe_files
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for pad_name, pad_token in (("eos", "<|endoftext|>"), ("bang", "!")):
        built = transformers.CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=MAX_LENGTH)
        built.save_pretrained(str(root / f"saved_{pad_name}" / "tokenizer"))
        folders[f"saved_{pad_name}"] = str(root / f"saved_{pad_name}")
        _legacy_folder(root / f"legacy_{pad_name}" / "tokenizer", vocab_file, merges_file, pad_token)
        folders[f"legacy_{pad_name}"] = str(root / f"legacy_{pad_name}")
    return folders


@pytest.mark.parametrize("folder", ["saved_eos", "saved_bang", "legacy_eos", "legacy_bang"])
def test_tokenizer_matches_transformers(tokenizer_folders, folder: str) -> None:
    path = tokenizer_folders[folder]
    reference = transformers.CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    ours = load_clip_tokenizer(path)
    assert ours.model_max_length == reference.model_max_length == MAX_LENGTH
    assert ours.pad_token_id == reference.pad_token_id == (0 if folder.endswith("bang") else reference.eos_token_id)
    assert [len(ours.encode(p)) > MAX_LENGTH - 2 for p in PROMPTS] == [p is LONG_PROMPT for p in PROMPTS]
    expected = reference(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    got = ours(PROMPTS)
    for prompt, want, have in zip(PROMPTS, expected.input_ids, got.input_ids):
        assert have.tolist() == want, f"{folder}: {prompt!r}"
    np.testing.assert_array_equal(got.attention_mask, np.asarray(expected.attention_mask))


def test_tokenizer_pad_token_differs(tokenizer_folders) -> None:
    """The folder's pad token is honoured: SD 2.x-style ``!`` (id 0) vs SD 1.x-style eos padding."""
    eos, bang = (load_clip_tokenizer(tokenizer_folders[name]) for name in ("saved_eos", "saved_bang"))
    eos_ids, bang_ids = eos("a cat").input_ids[0], bang("a cat").input_ids[0]
    assert eos_ids[-1] == eos.eos_token_id and bang_ids[-1] == 0
    np.testing.assert_array_equal(eos_ids[:4], bang_ids[:4])


# ---------------------------------------------------------------- text encoder


def _tiny_config(hidden_act: str, vocab_size: int) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def encoders(request, bpe_files, tmp_path_factory):
    """(transformers model, our model, our params) with weights far from their init (non-trivial attention)."""
    torch.manual_seed(0)
    reference = transformers.CLIPTextModel(_tiny_config(request.param, bpe_files[2])).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            noise = torch.randn_like(parameter)
            parameter.copy_(1 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    directory = str(tmp_path_factory.mktemp(f"clip_{request.param}"))
    reference.save_pretrained(directory)
    model, params = load_clip_text(directory)
    return reference, model, params


def _assert_close(ours, reference: np.ndarray, what: str) -> float:
    error = float(np.max(np.abs(np.asarray(ours, np.float64) - reference)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    print(f"{what}: max abs err {error:.3g}, reference scale {scale:.3g}")
    assert error <= 1e-5 * scale, f"{what}: max abs err {error} > 1e-5 * {scale}"
    return error


def test_encoder_matches_transformers(encoders, tokenizer_folders) -> None:
    reference, model, params = encoders
    rng = np.random.default_rng(0)
    tokens = load_clip_tokenizer(tokenizer_folders["saved_eos"])(PROMPTS[:4]).input_ids
    batches = [rng.integers(0, model.vocab_size, (2, MAX_LENGTH)), rng.integers(0, model.vocab_size, (3, 5)), tokens]
    for i, ids in enumerate(batches):
        with torch.no_grad():
            expected = reference(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()
        ours = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
        _assert_close(ours, expected, f"{model.hidden_act} batch {i} {tuple(ids.shape)}")


def test_encoder_hidden_states_and_mask(encoders) -> None:
    """Every hidden state (penultimate layer included) and a right-padded attention mask match."""
    reference, model, params = encoders
    ids = np.random.default_rng(1).integers(0, model.vocab_size, (2, 7))
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    last, hidden = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True)
    assert len(hidden) == len(expected.hidden_states) == model.num_hidden_layers + 1
    _assert_close(last, expected.last_hidden_state.numpy(), f"{model.hidden_act} masked")
    for i, (ours, theirs) in enumerate(zip(hidden, expected.hidden_states)):
        _assert_close(ours, theirs.numpy(), f"{model.hidden_act} hidden_states[{i}]")


def test_legacy_names_and_buffers(encoders) -> None:
    """transformers 4.x names (``text_model.`` prefix) and ``position_ids`` buffers convert to the same params."""
    reference, model, params = encoders
    legacy = {f"text_model.{k}": v for k, v in reference.state_dict().items()}
    legacy["text_model.embeddings.position_ids"] = torch.arange(MAX_LENGTH)[None]
    converted = clip_text_params_from_state_dict(legacy, model)
    assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(params)
    for ours, theirs in zip(jax.tree_util.tree_leaves(converted), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(ours, theirs)


def test_conversion_errors_name_the_tensor(encoders) -> None:
    reference, model, _ = encoders
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        clip_text_params_from_state_dict(missing, model)
    with pytest.raises(ValueError, match=r"text_projection\.weight"):
        clip_text_params_from_state_dict({**state, "text_projection.weight": np.zeros((32, 32))}, model)
    wrong = {**state, "encoder.layers.0.self_attn.q_proj.weight": np.zeros((32, 31), np.float32)}
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn\.q_proj\.weight"):
        clip_text_params_from_state_dict(wrong, model)


def test_config_refuses_unsupported_fields(encoders) -> None:
    config = encoders[0].config.to_dict()
    assert clip_text_from_config(config).hidden_act == encoders[1].hidden_act
    for field, value in [
        ("hidden_act", "relu"),
        ("model_type", "clip"),
        ("architectures", ["CLIPVisionModel"]),
        ("architectures", ["CLIPTextModel", "CLIPTextModelWithProjection"]),
        ("attention_dropout", 0.1),
        ("rope_theta", 10000.0),
    ]:
        with pytest.raises(UnsupportedCLIPConfig, match=field):
            clip_text_from_config({**config, field: value})
