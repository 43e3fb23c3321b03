"""A pure-Python CLIP BPE tokenizer giving transformers' ``CLIPTokenizer`` ids (as Stable Diffusion calls it).

transformers 5.x's ``CLIPTokenizer`` is backed by the ``tokenizers`` library and, whatever is
installed (it no longer uses ``ftfy`` nor ``html.unescape``), runs:

1. added (special) tokens are cut out first: ``normalized=False`` ones from the raw text,
   ``normalized=True`` ones from each normalised remainder (leftmost-longest matches);
2. normalisation: Unicode NFC, every run of whitespace -> one space, per-character lowercasing
   (so a final capital sigma becomes ``σ``, not ``ς``);
3. the CLIP split ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   (whitespace dropped), then byte-level's GPT-2 split (which only re-splits the two literals into
   ``<|``, the word, ``|>``), UTF-8 bytes -> GPT-2's printable characters;
4. BPE per word with ``</w>`` on its last symbol (lowest merge rank first, leftmost on ties),
   symbols missing from the vocabulary -> the unknown token;
5. ``[bos] + ids[: max_length - 2] + [eos]``, right-padded with the pad token to ``max_length``.

SD 1.x folders pad with ``<|endoftext|>``, SD 2.x ones with ``!`` (id 0); the pad token is an
added token, so a ``!`` typed in an SD 2.x prompt becomes id 0 too, as in transformers.
Character classes come from Python's ``unicodedata``; characters assigned in Unicode versions
newer than Python's may be classified differently from ``tokenizers``' Oniguruma tables.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

END_OF_WORD = "</w>"
_CACHE_SIZE = 100_000  # BPE results kept per tokenizer (words)
# Oniguruma's \s as tokenizers uses it (Python's str.isspace also counts \x1c-\x1f).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
_LITERALS = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# transformers' named special tokens, in the order it registers them (a later one with the same
# content replaces an earlier one), and CLIPTokenizer's defaults.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_DEFAULTS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


class TokenizedPrompts(NamedTuple):
    input_ids: np.ndarray  # (batch, max_length) int32
    attention_mask: np.ndarray  # (batch, max_length) int32: 1 for bos / text / eos, 0 for padding


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim before BPE (transformers' added / special tokens)."""

    content: str
    id: int
    normalized: bool = False  # matched in the normalised text (else in the raw text)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


@functools.lru_cache(maxsize=1 << 16)
def _char_kind(char: str) -> str:
    """'S' whitespace, 'L' letter, 'N' number, 'P' anything else (for the CLIP split)."""
    if char in WHITESPACE:
        return "S"
    category = unicodedata.category(char)[0]
    return category if category in "LN" else "P"


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, per-character lowercase (tokenizers' CLIP normaliser)."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if c in WHITESPACE else c for c in text)
    text = re.sub(" +", " ", text)
    return "".join(c.lower() for c in text)


def pre_tokenize(text: str) -> list[str]:
    """Splits normalised text into BPE words (the CLIP regex, then byte-level's GPT-2 regex)."""
    words, i = [], 0
    while i < len(text):
        kind = _char_kind(text[i])
        if kind == "S":
            i += 1
            continue
        literal = next((s for s in _LITERALS if text.startswith(s, i)), None)
        if literal is not None:  # GPT-2's split cuts the literal into punctuation / letters / punctuation
            words += ["<|", literal[2:-2], "|>"]
            i += len(literal)
            continue
        contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
        if contraction is not None:
            words.append(contraction)
            i += len(contraction)
            continue
        end = i + 1
        if kind != "N":  # numbers are single characters, letters / other characters are runs
            while end < len(text) and _char_kind(text[end]) == kind:
                end += 1
        words.append(text[i:end])
        i = end
    return words


def _split_on_tokens(text: str, tokens: Mapping[str, int]) -> list[str | int]:
    """Text with every leftmost-longest occurrence of ``tokens`` replaced by its id; other text kept."""
    if not tokens or not text:
        return [text] if text else []
    pattern = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    pieces: list[str | int] = []
    position = 0
    for match in re.finditer(pattern, text):
        if match.start() > position:
            pieces.append(text[position : match.start()])
        pieces.append(tokens[match.group()])
        position = match.end()
    if position < len(text):
        pieces.append(text[position:])
    return pieces


class CLIPTokenizer:
    """CLIP's byte-level BPE; ``__call__`` pads / truncates to ``model_max_length`` like SD pipelines."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        added_tokens: Sequence[AddedToken] = (),
        model_max_length: int | None = None,
    ) -> None:
        self.vocab = dict(vocab)
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, (left, right) in enumerate(merges):
            for part in (left, right, left + right):
                if part not in self.vocab:
                    raise ValueError(f"Merge {rank} ({left!r} {right!r}): {part!r} is not in the vocabulary.")
            self.ranks[(left, right)] = rank  # a repeated merge takes its later rank, as in tokenizers
        by_content = {token.content: token for token in added_tokens}  # a later duplicate wins
        self.raw_tokens = {t.content: t.id for t in by_content.values() if not t.normalized}
        self.normalized_tokens = {normalize(t.content): t.id for t in by_content.values() if t.normalized}
        self.model_max_length = model_max_length
        ids = {**self.vocab, **{t.content: t.id for t in by_content.values()}}
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token)):
            if token not in ids:
                raise ValueError(f"{name} {token!r} is neither in the vocabulary nor an added token.")
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids[bos_token], ids[eos_token], ids[pad_token]
        self.unk_token_id = ids.get(unk_token)
        self._byte_encoder = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    def bpe(self, word: str) -> list[str]:
        """BPE symbols of one byte-encoded word (``</w>`` appended to its last symbol)."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            rank, i = min((self.ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if rank == math.inf:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    def _word_ids(self, word: str) -> list[int]:
        if word not in self._cache:
            encoded = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids = []
            for symbol in self.bpe(encoded):
                token_id = self.vocab.get(symbol, self.unk_token_id)
                if token_id is None:
                    raise ValueError(f"BPE symbol {symbol!r} is not in the vocabulary and there is no unk_token.")
                ids.append(token_id)
            if len(self._cache) > _CACHE_SIZE:
                self._cache.clear()
            self._cache[word] = ids
        return self._cache[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos / eos, padding or truncation."""
        ids: list[int] = []
        for raw in _split_on_tokens(text, self.raw_tokens):
            if isinstance(raw, int):
                ids.append(raw)
                continue
            for piece in _split_on_tokens(normalize(raw), self.normalized_tokens):
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    for word in pre_tokenize(piece):
                        ids += self._word_ids(word)
        return ids

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> TokenizedPrompts:
        """``tokenizer(prompts, padding="max_length", truncation=True, max_length=model_max_length)``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        max_length = max_length or self.model_max_length
        if max_length is None:
            raise ValueError("No max_length given and the tokenizer folder sets no model_max_length.")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the bos and eos tokens.")
        input_ids = np.full((len(prompts), max_length), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(prompts), max_length), np.int32)
        for row, prompt in enumerate(prompts):
            ids = [self.bos_token_id, *self.encode(prompt)[: max_length - 2], self.eos_token_id]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return TokenizedPrompts(input_ids, attention_mask)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _vocab_and_merges(directory: str) -> tuple[dict[str, int], list[tuple[str, str]], list[dict[str, Any]]]:
    """(vocab, merges, tokenizer.json added tokens) from tokenizer.json, else vocab.json + merges.txt."""
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(tokenizer_json):  # transformers prefers it too
        data = _read_json(tokenizer_json)
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{tokenizer_json}: model type {model.get('type')!r}, expected 'BPE'.")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return dict(model["vocab"]), merges, list(data.get("added_tokens", []))
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    for path in (vocab_path, merges_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Missing {path} (a CLIP tokenizer folder has tokenizer.json or vocab.json + merges.txt)."
            )
    merges = []
    with open(merges_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{number}: expected two space-separated symbols, got {line!r}.")
            merges.append((parts[0], parts[1]))
    return _read_json(vocab_path), merges, []


def _token_fields(value: Any, where: str, special_default: bool) -> tuple[str, bool]:
    """(content, normalized) of a token given as a string or an AddedToken dict."""
    if isinstance(value, str):
        return value, False  # transformers makes it AddedToken(value, special=True): not normalized
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        if value.get("single_word"):
            raise ValueError(f"{where}: single_word=True added tokens are not supported ({value['content']!r}).")
        return value["content"], bool(value.get("normalized", not value.get("special", special_default)))
    raise ValueError(f"{where}: expected a token string or an AddedToken dict, got {value!r}.")


def _added_tokens(
    config: Mapping[str, Any],
    special_map: Mapping[str, Any],
    json_tokens: list[dict[str, Any]],
    vocab: Mapping[str, int],
) -> tuple[dict[str, str], list[AddedToken]]:
    """(named special token contents, added tokens in registration order) as transformers 5 resolves them."""
    decoder = config.get("added_tokens_decoder")
    # key -> (value, whether transformers builds it as AddedToken(..., special=True))
    named = {key: (config.get(key), False) for key in _SPECIAL_TOKEN_KEYS}
    if decoder is None:  # legacy folders: special_tokens_map.json overrides tokenizer_config.json
        named.update({k: (v, True) for k, v in special_map.items() if k in named and v is not None})
        entries = [(t["id"], t) for t in json_tokens]
    else:
        entries = sorted((int(i), t) for i, t in decoder.items())
    added: list[AddedToken] = []
    for token_id, entry in entries:
        content, normalized = _token_fields(entry, "added_tokens", False)
        added.append(AddedToken(content, int(token_id), normalized))
    existing = {t.content for t in added}
    contents: dict[str, str] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value, special = named[key]
        value = value if value is not None else _CLIP_DEFAULTS.get(key)
        if value is None:
            continue
        content, normalized = _token_fields(value, key, special_default=special)
        contents[key] = content
        if content not in existing:
            if content not in vocab:
                raise ValueError(f"{key} {content!r} is not in the vocabulary (and has no added-token id).")
            added.append(AddedToken(content, vocab[content], normalized))
    return contents, added


def load_clip_tokenizer(path: str) -> CLIPTokenizer:
    """Reads a CLIP tokenizer folder (or a model folder with a ``tokenizer/`` subfolder).

    Uses ``tokenizer.json`` (what transformers 5 ``save_pretrained`` writes) or ``vocab.json`` +
    ``merges.txt`` (SD hub folders), and ``tokenizer_config.json`` / ``special_tokens_map.json``
    for bos / eos / unk / pad, added tokens and ``model_max_length``.
    """
    directory = path
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.json")):
        if os.path.isdir(os.path.join(path, "tokenizer")):
            directory = os.path.join(path, "tokenizer")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No CLIP tokenizer folder at {path}.")
    vocab, merges, json_tokens = _vocab_and_merges(directory)
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    map_path = os.path.join(directory, "special_tokens_map.json")
    special_map = _read_json(map_path) if os.path.isfile(map_path) else {}
    contents, added = _added_tokens(config, special_map, json_tokens, vocab)
    max_length = config.get("model_max_length")
    if max_length is not None and max_length > 1_000_000:  # transformers' "unset" sentinel
        max_length = None
    return CLIPTokenizer(
        vocab,
        merges,
        bos_token=contents["bos_token"],
        eos_token=contents["eos_token"],
        pad_token=contents["pad_token"],
        unk_token=contents["unk_token"],
        added_tokens=added,
        model_max_length=None if max_length is None else int(max_length),
    )
