"""SD3's T5 tokenizer (``tokenizer_3``): transformers' ``T5TokenizerFast`` ids from ``tokenizer.json``.

Runs on HF's Rust ``tokenizers`` package (no torch, no transformers), imported when a tokenizer
is loaded; install it with ``pip install tokenizers`` (the ``sd3`` extra). The backend is rebuilt
the way transformers 5's ``T5Tokenizer`` rebuilds a ``tokenizer.json`` (``TokenizersBackend.
convert_to_native_format`` + ``T5Tokenizer.__init__``), so SD3 folders saved by transformers 4.x
tokenize as transformers 5 does:

- model: the file's Unigram (vocabulary, scores, ``unk_id``) and its added tokens;
- normalizer: only the file's SentencePiece ``Precompiled`` charsmap where it has one (4.x files'
  ``Replace(" {2,}", " ")`` is dropped; the whitespace split below does its work), else none;
- pre-tokenizer: ``WhitespaceSplit`` then ``Metaspace("▁", prepend_scheme="always", split=True)``;
- post-processor: ``$A </s>`` (the config's ``eos_token``); the config's special tokens (eos, unk,
  pad, ``<extra_id_*>``) are matched verbatim before normalisation.

Calls pad / truncate like ``tokenizer(prompts, padding="max_length", max_length=n, truncation=True)``:
at most ``n - 1`` text tokens, then ``</s>``, then the pad token (``<pad>``, id 0) up to ``n``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from codi_jax.models.clip_tokenizer import TokenizedPrompts

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
_DEFAULT_SPECIALS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def _token_content(value: Any, field: str) -> str:
    """A special token's text from tokenizer_config.json (a string or an ``AddedToken`` dict)."""
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str) or not content:
        raise ValueError(f"{CONFIG_FILE}: {field}={value!r} is not a token.")
    return content


def _special_tokens(config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """({eos_token, unk_token, pad_token} -> text, extra special tokens) of a tokenizer_config.json."""
    named = {key: _token_content(config.get(key) or default, key) for key, default in _DEFAULT_SPECIALS.items()}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # transformers 5 may save named extra tokens
        extra = list(extra.values())
    return named, [_token_content(token, "additional_special_tokens") for token in extra]


def _precompiled_charsmap(normalizer: dict[str, Any] | None) -> bytes | None:
    """The SentencePiece charsmap of a tokenizer.json normalizer (alone or in a Sequence), if any."""
    if not normalizer:
        return None
    parts = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return base64.b64decode(part["precompiled_charsmap"])
    return None


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError("The T5 tokenizer needs HF's `tokenizers` package: pip install tokenizers") from error
    return tokenizers


class T5Tokenizer:
    """Prompts -> padded ids as transformers' ``T5TokenizerFast`` gives them (``load_t5_tokenizer``)."""

    def __init__(self, backend: Any, eos_token: str, pad_token: str, model_max_length: int | None) -> None:
        self.backend = backend
        self.eos_token_id = self._id(eos_token)
        self.pad_token, self.pad_token_id = pad_token, self._id(pad_token)
        self.model_max_length = model_max_length

    def _id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{TOKENIZER_FILE}: the special token {token!r} is not in the vocabulary.")
        return int(token_id)

    def encode(self, prompt: str) -> list[int]:
        """The ids of one prompt with ``</s>``, neither truncated nor padded."""
        self.backend.no_truncation()
        self.backend.no_padding()
        return list(self.backend.encode(prompt).ids)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> TokenizedPrompts:
        """(batch, max_length) ids and attention mask; ``max_length`` None: ``model_max_length``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = max_length or self.model_max_length
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r}: expected an int >= 2 (the tokenizer has no default).")
        self.backend.enable_truncation(max_length)
        self.backend.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        encodings = self.backend.encode_batch(prompts)
        ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(prompts), max_length)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32).reshape(len(prompts), max_length)
        return TokenizedPrompts(ids, mask)


def _tokenizer_dir(path: str) -> str:
    """``path``, or its ``tokenizer_3/`` where ``path`` is an SD3 pipeline folder."""
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)) and os.path.isdir(os.path.join(path, "tokenizer_3")):
        path = os.path.join(path, "tokenizer_3")
    if not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        raise FileNotFoundError(f"No {TOKENIZER_FILE} in {path} (a T5 tokenizer folder, or SD3's tokenizer_3/).")
    return path


def _backend(tokenizers: Any, file: str, eos_token: str, specials: list[str]) -> Any:
    """The Rust tokenizer of ``file`` rebuilt as transformers 5's ``T5Tokenizer`` does (module docstring)."""
    with open(file, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("model", {}).get("type") != "Unigram":
        raise ValueError(f"{file}: model type {spec.get('model', {}).get('type')!r}, expected 'Unigram' (T5).")
    backend = tokenizers.Tokenizer.from_file(file)
    charsmap = _precompiled_charsmap(spec.get("normalizer"))
    backend.normalizer = None if charsmap is None else tokenizers.normalizers.Precompiled(charsmap)
    pre = tokenizers.pre_tokenizers
    backend.pre_tokenizer = pre.Sequence(
        [pre.WhitespaceSplit(), pre.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    eos_id = backend.token_to_id(eos_token)
    if eos_id is None:
        raise ValueError(f"{file}: eos_token {eos_token!r} is not in the vocabulary.")
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single=["$A", eos_token], pair=["$A", eos_token, "$B", eos_token], special_tokens=[(eos_token, eos_id)]
    )
    return backend


def load_t5_tokenizer(path: str) -> T5Tokenizer:
    """The T5 tokenizer of a folder with ``tokenizer.json`` (+ ``tokenizer_config.json``), or of an SD3
    pipeline folder's ``tokenizer_3/``."""
    tokenizers = _import_tokenizers()
    directory = _tokenizer_dir(path)
    config_file = os.path.join(directory, CONFIG_FILE)
    config: dict[str, Any] = {}
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    named, extra = _special_tokens(config)
    specials = list(dict.fromkeys([named["eos_token"], named["unk_token"], named["pad_token"], *extra]))
    backend = _backend(tokenizers, os.path.join(directory, TOKENIZER_FILE), named["eos_token"], specials)
    max_length = config.get("model_max_length")
    max_length = max_length if isinstance(max_length, int) and 0 < max_length < 1 << 30 else None
    return T5Tokenizer(backend, named["eos_token"], named["pad_token"], max_length)
