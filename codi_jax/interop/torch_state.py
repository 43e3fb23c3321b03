"""Reading PyTorch state dicts from local files and mapping them onto flax variables.

The shared name mapping and loop of the diffusers / transformers converters (``torch_names``,
``params_from_state_dict``, ``read_safetensors``) live here too; this module imports nothing
from ``codi_jax.models``.

The perceptual metrics (FID / KID Inception, LPIPS) run networks whose published weights are
PyTorch state dicts. Nothing here downloads: the user passes local paths. Accepted files:

- ``.safetensors`` (needs the ``safetensors`` package),
- ``.npz`` (numpy only; e.g. ``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``),
- ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(..., weights_only=True)``; needs torch).

Layouts: conv ``weight`` (out, in, kh, kw) -> flax ``kernel`` (kh, kw, in, out); batch norm
``weight`` / ``bias`` / ``running_mean`` / ``running_var`` -> ``scale`` / ``bias`` / ``mean`` /
``var``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
# safetensors dtype names -> numpy / ml_dtypes (the file is little-endian)
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jax.numpy.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# flax leaf name -> (torch parameter name, layout change)
_LEAF_TO_TORCH: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "kernel": ("weight", lambda w: np.transpose(w, (2, 3, 1, 0))),
    "bias": ("bias", lambda b: b),
    "scale": ("weight", lambda s: s),
    "mean": ("running_mean", lambda m: m),
    "var": ("running_var", lambda v: v),
}


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """name -> float32 array from a local weights file; ``what`` names the weights in errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights file not found: {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(f"reading {what} weights from {path!r} needs `pip install safetensors`") from error
        raw: Mapping[str, Any] = _load_safetensors(load_file, path)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            raw = {name: archive[name] for name in archive.files}
    elif suffix in _TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f"reading {what} weights from the PyTorch file {path!r} needs torch; "
                "or save the state dict as .safetensors / .npz"
            ) from error
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
            raw = raw["state_dict"]
        if not isinstance(raw, Mapping):
            raise ValueError(f"{what} weights file {path!r} holds a {type(raw).__name__}, not a state dict")
        raw = {name: value.detach().cpu().numpy() for name, value in raw.items() if hasattr(value, "detach")}
    else:
        raise ValueError(
            f"{what} weights file {path!r}: unknown suffix {suffix!r} (expected .safetensors, .npz, .pth, .pt, .bin)"
        )
    return {name: np.asarray(value) for name, value in raw.items()}


def _preview(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray],
    abstract_variables: Any,
    torch_prefix: Callable[[tuple[str, ...]], str],
    *,
    what: str,
    ignored: Callable[[str], bool] = lambda name: False,
) -> dict[str, Any]:
    """Fills a flax variables tree (shapes from ``jax.eval_shape(model.init, ...)``) from a state dict.

    ``torch_prefix`` maps a flax module path (without collection and leaf name) to the torch
    module name. Raises ``KeyError`` naming missing / unexpected keys (except those ``ignored``)
    and ``ValueError`` naming a key whose shape differs.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_variables))
    converted, used, missing = {}, set(), []
    for path, leaf in flat.items():
        torch_leaf, to_flax = _LEAF_TO_TORCH[path[-1]]
        name = f"{torch_prefix(path[1:-1])}.{torch_leaf}"
        if name not in state_dict:
            missing.append(name)
            continue
        value = to_flax(np.asarray(state_dict[name], np.float32))
        if value.shape != tuple(leaf.shape):
            raise ValueError(
                f"{what} weights: {name!r} has shape {tuple(np.shape(state_dict[name]))}, "
                f"expected the PyTorch layout of {tuple(leaf.shape)} (flax {'/'.join(path)})"
            )
        converted[path] = jax.numpy.asarray(value)
        used.add(name)
    unexpected = [name for name in state_dict if name not in used and not ignored(name)]
    if missing:
        raise KeyError(f"{what} weights: {len(missing)} expected keys are missing: {_preview(missing)}")
    if unexpected:
        raise KeyError(f"{what} weights: unexpected keys (wrong file?): {_preview(unexpected)}")
    return flax.traverse_util.unflatten_dict(converted)


# ---------------------------------------------------------------------------------------------
# The diffusers / transformers converters: our parameter paths <-> PyTorch names, and the loop
# that fills a parameter tree from a state dict.
# ---------------------------------------------------------------------------------------------


def torch_names(indexed: re.Pattern[str], leaves: Mapping[str, str], source: str) -> Callable[[tuple[str, ...]], str]:
    """A function mapping our parameter path to its PyTorch state-dict name.

    A module name matching ``indexed`` becomes its (non-empty) groups, e.g. ``down_blocks_0`` ->
    ``down_blocks.0``; the leaf is renamed by ``leaves``. ``source`` (``"diffusers"``) names the
    library in the error for a leaf without counterpart.
    """

    def torch_name(path: tuple[str, ...]) -> str:
        parts = []
        for component in path[:-1]:
            match = indexed.match(component)
            parts.extend([p for p in match.groups() if p is not None] if match else [component])
        if path[-1] not in leaves:
            raise ValueError(f"No {source} counterpart for parameter {'/'.join(path)} (leaf {path[-1]!r}).")
        return ".".join(parts + [leaves[path[-1]]])

    return torch_name


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array of ``value``; a torch tensor (from ``model.state_dict()``) as float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


def checked_float32(
    converted: np.ndarray, expected: Sequence[int], torch_name: str, our_path: str, source_shape: str
) -> np.ndarray:
    """``converted`` as contiguous float32 if its shape is ``expected``; else a ``ValueError`` naming both
    sides (``source_shape``, e.g. ``"diffusers (4, 3)"``, says what the state dict held)."""
    if tuple(converted.shape) != tuple(expected):
        raise ValueError(
            f"Shape mismatch for {torch_name} ({source_shape}) -> {our_path}: expected "
            f"{tuple(expected)} after conversion, got {tuple(converted.shape)}."
        )
    return np.ascontiguousarray(converted, dtype=np.float32)


def named_leaves(tree: Any) -> tuple[dict[tuple[str, ...], Any], Any]:
    """``({key path: leaf}, treedef)`` of a nested-dict tree, in flattening order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(k.key for k in key_path): leaf for key_path, leaf in flat}, treedef


def _first_ten(names: Sequence[str]) -> str:
    return f"{list(names[:10])}{' ...' if len(names) > 10 else ''}"


def params_from_state_dict(
    state_dict: Mapping[str, Any],
    shapes: Any,
    name_of: Callable[[tuple[str, ...]], str],
    convert: Callable[[str, str, np.ndarray, tuple[int, ...]], np.ndarray],
    *,
    missing_what: str,
    unused_what: str,
) -> Any:
    """Fills the parameter tree ``shapes`` from ``state_dict`` (name -> numpy array or torch tensor).

    ``name_of`` maps a parameter path to its state-dict name; ``convert(torch_name, our_path,
    tensor, expected_shape)`` changes the layout and checks the shape. Every parameter must be
    present and every tensor used, else a ``ValueError``: ``"<n> <missing_what>: [...]"`` or
    ``"<n> <unused_what>: [...]"``. Returns float32 numpy arrays in ``shapes``' structure.
    """
    leaves, treedef = named_leaves(shapes)
    converted, missing, used = [], [], set()
    for path, shape in leaves.items():
        name, our_path = name_of(path), "/".join(path)
        if name not in state_dict:
            missing.append(f"{name} (for {our_path})")
            continue
        used.add(name)
        converted.append(convert(name, our_path, as_numpy(state_dict[name]), shape.shape))
    if missing:
        raise ValueError(f"{len(missing)} {missing_what}: {_first_ten(missing)}")
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f"{len(unused)} {unused_what}: {_first_ten(unused)}")
    return jax.tree_util.tree_unflatten(treedef, converted)


# transformers ``PretrainedConfig`` fields that do not change a text encoder's hidden states at inference
# (token ids, init, bookkeeping, generic flags, generation settings that 4.x configs carry along).
TRANSFORMERS_INERT_CONFIG_FIELDS = frozenset(
    "_name_or_path _commit_hash transformers_version dtype torch_dtype initializer_range initializer_factor "
    "bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id return_dict "
    "output_hidden_states output_attentions torchscript use_bfloat16 tie_word_embeddings is_encoder_decoder "
    "is_decoder add_cross_attention chunk_size_feed_forward pruned_heads id2label label2id problem_type "
    "tokenizer_class prefix task_specific_params finetuning_task cross_attention_hidden_size tf_legacy_loss "
    "use_cache _attn_implementation _attn_implementation_autoset tie_encoder_decoder "
    "bad_words_ids begin_suppress_tokens diversity_penalty do_sample early_stopping "
    "encoder_no_repeat_ngram_size exponential_decay_length_penalty forced_bos_token_id forced_eos_token_id "
    "length_penalty max_length min_length no_repeat_ngram_size num_beam_groups num_beams "
    "num_return_sequences output_scores remove_invalid_values repetition_penalty return_dict_in_generate "
    "suppress_tokens temperature top_k top_p typical_p".split()
)


def architecture_defaults(module: type, inherited: type | None = None) -> dict[str, Any]:
    """A converter's config.json defaults, read off the flax module class that holds them as fields:
    every dataclass field and its default but ``dtype`` (and linen's ``parent`` / ``name``) and the
    fields of ``inherited``."""
    skip = {"dtype", "parent", "name"} | ({f.name for f in dataclasses.fields(inherited)} if inherited else set())
    return {f.name: f.default for f in dataclasses.fields(module) if f.name not in skip}


def linear_tensor(torch_name: str, our_path: str, tensor: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """A transformers tensor in our layout (``convert`` of ``params_from_state_dict``): linear ``weight``
    (out, in) -> ``kernel`` (in, out); embeddings and norm weights unchanged; shape checked, float32."""
    converted = tensor.T if our_path.endswith("kernel") and tensor.ndim == 2 else tensor
    return checked_float32(converted, expected, torch_name, our_path, f"transformers {tuple(tensor.shape)}")


def transformers_model_files(path: str, subfolder: str, what: str, variant: str | None = None) -> tuple[str, list[str]]:
    """(config.json path, safetensors files) of a transformers model: its ``save_pretrained`` directory
    (``model.safetensors`` or a sharded index; ``variant`` files where given), a pipeline directory
    holding it in ``subfolder``, or the ``.safetensors`` file with its ``config.json`` beside it.
    ``what`` names the model in errors."""
    if os.path.isfile(path):
        return os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"), [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No {what} at {path}: neither a directory nor a file.")
    directory = path
    if not os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(os.path.join(path, subfolder)):
        directory = os.path.join(path, subfolder)  # a pipeline directory
    bin_hint = ("pytorch_model.bin", "pytorch_model.bin")
    weights = safetensors_files(
        directory, "model.safetensors", "model.safetensors.index.json", what, bin_hint, variant=variant
    )
    return os.path.join(directory, "config.json"), weights


def variant_name(name: str, variant: str) -> str:
    """diffusers' / transformers' ``_add_variant``: the variant before the last suffix
    (``model.safetensors`` -> ``model.fp16.safetensors``, ``model.safetensors.index.json`` ->
    ``model.safetensors.index.fp16.json``; shards are named in the index)."""
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def weights_variants(directory: str, weights_name: str, index_name: str) -> tuple[str, ...]:
    """The variants (``fp16``, ``bf16``, ...) whose weights ``directory`` holds: a single
    ``variant_name(weights_name)`` file or a ``variant_name(index_name)`` index; sorted."""
    patterns = [
        re.compile(re.escape(name.rsplit(".", 1)[0]) + r"\.(\w+)\." + re.escape(name.rsplit(".", 1)[1]))
        for name in (weights_name, index_name)
    ]
    found = {match.group(1) for n in os.listdir(directory) for p in patterns if (match := p.fullmatch(n))}
    return tuple(sorted(found))


def safetensors_files(
    directory: str,
    weights_name: str,
    index_name: str,
    what: str,
    bin_hint: tuple[str, str],
    variant: str | None = None,
) -> list[str]:
    """The weights files of a ``save_pretrained`` directory: the shards its ``index_name`` lists, else
    ``weights_name``; with ``variant`` (``"fp16"``), those names with the variant (``variant_name``).

    A missing file is a ``FileNotFoundError`` naming it (``what`` names the weights); where the
    PyTorch file ``bin_hint[0]`` is there instead, the message says so, calling it ``bin_hint[1]``.
    """
    if variant:
        weights_name, index_name = variant_name(weights_name, variant), variant_name(index_name, variant)
    index = os.path.join(directory, index_name)
    if os.path.isfile(index):
        with open(index) as f:
            weights = [os.path.join(directory, shard) for shard in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        weights = [os.path.join(directory, weights_name)]
    for file in weights:
        if not os.path.isfile(file):
            hint = ""
            if os.path.isfile(os.path.join(directory, bin_hint[0])):
                hint = f" (only a PyTorch {bin_hint[1]} is there: save it as safetensors first)"
            raise FileNotFoundError(f"Missing {what} weights file {file}{hint}.")
    return weights


def read_safetensors(files: Sequence[str], what: str) -> dict[str, np.ndarray]:
    """The tensors of the ``.safetensors`` ``files`` in one dict; ``what`` names the weights in the import error."""
    try:
        from safetensors.numpy import load_file
    except ImportError as error:  # pragma: no cover - safetensors is installed with the test extras
        message = f"Reading {what} weights needs the `safetensors` package (pip install safetensors)."
        raise ImportError(message) from error
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        state_dict.update(_load_safetensors(load_file, file))
    return state_dict


def _upcast(value: np.ndarray) -> np.ndarray:
    """16-bit floats (a ``fp16`` / ``bf16`` variant) as float32: the parameters are float32 masters."""
    return value.astype(np.float32) if value.dtype in (np.float16, jax.numpy.bfloat16) else value


def _load_safetensors(load_file: Any, path: str) -> dict[str, np.ndarray]:
    """``load_file(path)`` with 16-bit floats upcast to float32 (bfloat16, which numpy lacks, read
    as ``jax.numpy.bfloat16``); a truncated or foreign file is one readable ``ValueError``."""
    try:
        raw = _load_bfloat16(path) if _has_bfloat16(path) else load_file(path)
    except Exception as error:  # safetensors' SafetensorError, or an OSError while reading
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{path} is not a readable safetensors file ({cause}): download or save it again.") from None
    return {name: _upcast(value) for name, value in raw.items()}


def _safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a ``.safetensors`` file and the offset where its data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= min(_MAX_HEADER, os.path.getsize(path) - 8):
            raise ValueError(f"header size {size} does not fit the file")
        return json.loads(f.read(size)), 8 + size


def _has_bfloat16(path: str) -> bool:
    try:
        header, _ = _safetensors_header(path)
    except (ValueError, OSError):
        return False  # load_file names the fault
    return any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values())


def _load_bfloat16(path: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file holding bfloat16 (``safetensors.numpy`` refuses that dtype)."""
    header, start = _safetensors_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if end > len(data):
            raise ValueError(f"tensor {name} ends at byte {end} past the data's {len(data)}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
        tensors[name] = np.frombuffer(data, dtype, count=(end - begin) // dtype.itemsize, offset=begin)
        tensors[name] = tensors[name].reshape(entry["shape"])
    return tensors
