"""HF Qwen2.5-VL safetensors folders <-> our parameter pytree, in both directions.

Loading reads tensors through memory maps, one slice at a time: with `shardings` (or a `mesh`), every leaf is built
with `jax.make_array_from_callback`, so each host reads only the slices its devices hold and a 7B checkpoint is never
materialised whole on one host. Both naming schemes are read: transformers-5 (`model.language_model.*`,
`model.visual.*`, `lm_head.*`) and the legacy hub names (`model.*`, `visual.*`, `lm_head.*`). Export writes the
transformers-5 names and config, so that `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads it.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl.config import Qwen25VLConfig

_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32)
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
                    "chat_template.json", "preprocessor_config.json", "special_tokens_map.json",
                    "generation_config.json")

# --------------------------------------------------------------------------------------------- safetensors I/O


@dataclasses.dataclass(frozen=True)
class _Entry:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # absolute byte offset of the tensor data in `file`


def _read_header(path: str) -> dict[str, _Entry]:
  with open(path, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
    entries[name] = _Entry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + info["data_offsets"][0])
  return entries


class SafetensorsFolder:
  """Memory-mapped, slice-wise read access to the tensors of an HF folder (single file or sharded)."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
      files = ["model.safetensors"]
    else:
      raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {hf_dir!r}: "
                              "expected an HF Qwen2.5-VL checkpoint folder.")
    self.hf_dir = hf_dir
    self.entries: dict[str, _Entry] = {}
    for file in files:
      path = os.path.join(hf_dir, file)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir!r}: the index names {file} but the file is missing.")
      self.entries.update(_read_header(path))

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    """`tensor[index]` of the stored tensor, reading only the pages it covers."""
    if name not in self.entries:
      raise KeyError(f"{self.hf_dir!r} has no tensor {name!r}; is it a Qwen2.5-VL checkpoint of this config?")
    e = self.entries[name]
    mapped = np.memmap(e.file, dtype=e.dtype, mode="r", offset=e.offset, shape=e.shape)
    return np.array(mapped[index])


def _write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]]):
  """Streams tensors to one safetensors file; each `produce()` is called once, when its bytes are written."""
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, shape, dtype, produce in tensors:
      array = np.ascontiguousarray(produce(), dtype=dtype)
      assert array.shape == tuple(shape), (name, array.shape, shape)
      f.write(array.tobytes())


# ------------------------------------------------------------------------------------------ name/layout mapping


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """How one leaf of our tree is stored: HF tensor names (one per stacked layer) and its layout change."""
  names: tuple[str, ...]
  stacked: bool
  layout: str  # 'same' | 'transpose' (torch Linear (out, in) -> (in, out)) | 'conv' (Conv3d -> (1176, Dv))


def _leaf_specs(config: Qwen25VLConfig, text_prefix: str, vision_prefix: str) -> dict[tuple[str, ...], _Leaf]:
  t, v = config.text, config.vision
  specs: dict[tuple[str, ...], _Leaf] = {}

  def single(path, name, layout="same"):
    specs[path] = _Leaf((name,), False, layout)

  def stacked(path, pattern, count, layout="same"):
    specs[path] = _Leaf(tuple(pattern.format(i=i) for i in range(count)), True, layout)

  single(("text", "embed"), f"{text_prefix}embed_tokens.weight")
  single(("text", "norm"), f"{text_prefix}norm.weight")
  if not t.tie_word_embeddings:
    single(("text", "lm_head"), "lm_head.weight", "transpose")
  layer = text_prefix + "layers.{i}."
  stacked(("text", "layers", "attn_norm"), layer + "input_layernorm.weight", t.num_layers)
  stacked(("text", "layers", "mlp_norm"), layer + "post_attention_layernorm.weight", t.num_layers)
  for ours in ("q", "k", "v", "o"):
    stacked(("text", "layers", ours, "w"), layer + f"self_attn.{ours}_proj.weight", t.num_layers, "transpose")
    if ours != "o":
      stacked(("text", "layers", ours, "b"), layer + f"self_attn.{ours}_proj.bias", t.num_layers)
  for ours in ("gate", "up", "down"):
    stacked(("text", "layers", ours, "w"), layer + f"mlp.{ours}_proj.weight", t.num_layers, "transpose")

  single(("vision", "patch_embed", "w"), f"{vision_prefix}patch_embed.proj.weight", "conv")
  block = vision_prefix + "blocks.{i}."
  stacked(("vision", "blocks", "norm1"), block + "norm1.weight", v.depth)
  stacked(("vision", "blocks", "norm2"), block + "norm2.weight", v.depth)
  for ours, theirs in (("qkv", "attn.qkv"), ("proj", "attn.proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                       ("down", "mlp.down_proj")):
    stacked(("vision", "blocks", ours, "w"), block + theirs + ".weight", v.depth, "transpose")
    stacked(("vision", "blocks", ours, "b"), block + theirs + ".bias", v.depth)
  single(("vision", "merger", "norm"), f"{vision_prefix}merger.ln_q.weight")
  for ours, theirs in (("fc1", "mlp.0"), ("fc2", "mlp.2")):
    single(("vision", "merger", ours, "w"), f"{vision_prefix}merger.{theirs}.weight", "transpose")
    single(("vision", "merger", ours, "b"), f"{vision_prefix}merger.{theirs}.bias")
  return specs


def _prefixes(names) -> tuple[str, str]:
  """(text prefix, vision prefix) of the naming scheme that `names` use."""
  if "model.language_model.embed_tokens.weight" in names:
    return "model.language_model.", "model.visual."
  if "model.embed_tokens.weight" in names:
    return "model.", "visual."
  raise ValueError("Neither model.language_model.embed_tokens.weight (transformers 5) nor model.embed_tokens.weight "
                   "(legacy hub names) is in the checkpoint: is it a Qwen2.5-VL checkpoint?")


def _our_shape(leaf: _Leaf, stored: tuple[int, ...]) -> tuple[int, ...]:
  if leaf.layout == "transpose":
    inner = stored[::-1]
  elif leaf.layout == "conv":
    inner = (int(np.prod(stored[1:])), stored[0])
  else:
    inner = stored
  return ((len(leaf.names),) if leaf.stacked else ()) + tuple(inner)


def _read_layer(folder: SafetensorsFolder, name: str, layout: str, index: tuple) -> np.ndarray:
  """Our-layout slice `index` of one (unstacked) tensor, reading only what it needs where the layout allows."""
  if layout == "transpose":
    return folder.read(name, tuple(index[::-1])).T
  if layout == "conv":
    full = folder.read(name)
    return full.reshape(full.shape[0], -1).T[index]
  return folder.read(name, tuple(index))


def _read_leaf(folder: SafetensorsFolder, leaf: _Leaf, shape: tuple[int, ...], index, dtype) -> np.ndarray:
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
  if not leaf.stacked:
    return _read_layer(folder, leaf.names[0], leaf.layout, index).astype(dtype)
  layers = range(*index[0].indices(shape[0])) if isinstance(index[0], slice) else [index[0]]
  parts = [_read_layer(folder, leaf.names[i], leaf.layout, index[1:]).astype(dtype) for i in layers]
  return np.stack(parts) if isinstance(index[0], slice) else parts[0]


def _tree_set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _tree_get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


# ------------------------------------------------------------------------------------------------- public API


def load_pretrained(hf_dir: str, dtype: Any = jnp.bfloat16, mesh: jax.sharding.Mesh | None = None,
                    shardings: Any = None) -> tuple[Qwen25VLConfig, dict[str, Any]]:
  """`(config, params)` of an HF Qwen2.5-VL folder; params in `dtype`, which also becomes the compute dtype.

  `shardings`: a pytree of `jax.sharding.Sharding` matching the params (or a function `path tuple -> Sharding`);
  each leaf is then assembled from the slices its devices hold. With only a `mesh`, leaves are replicated over it.
  Without either, leaves go to the default device.
  """
  config = config_lib.from_hf_config(hf_dir)
  np_dtype = np.dtype(jnp.dtype(dtype))
  config = config.replace(dtype=np_dtype.name)
  folder = SafetensorsFolder(hf_dir)
  specs = _leaf_specs(config, *_prefixes(folder.entries))
  params: dict[str, Any] = {}
  for path, leaf in specs.items():
    missing = [n for n in leaf.names if n not in folder]
    if missing:
      raise ValueError(f"{hf_dir!r} lacks {len(missing)} tensors the config needs, e.g. {missing[0]!r}.")
    shape = _our_shape(leaf, folder.entries[leaf.names[0]].shape)
    sharding = _sharding_for(path, shardings, mesh)
    if sharding is None:
      value = jnp.asarray(_read_leaf(folder, leaf, shape, (), np_dtype))
    else:
      value = jax.make_array_from_callback(
          shape, sharding, lambda index, leaf=leaf, shape=shape: _read_leaf(folder, leaf, shape, index, np_dtype))
    _tree_set(params, path, value)
  return config, params


def _sharding_for(path, shardings, mesh):
  if shardings is not None:
    return shardings(path) if callable(shardings) else _tree_get(shardings, path)
  if mesh is not None:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return None


def _host_array(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_pretrained(params: dict[str, Any], config: Qwen25VLConfig, out_dir: str, dtype: Any = jnp.bfloat16,
                    max_shard_bytes: int = 4 * 1024 ** 3, tokenizer_dir: str | None = None) -> str:
  """Writes an HF folder (config.json + safetensors, sharded above `max_shard_bytes`) that transformers loads.

  Tensors are converted one at a time. `tokenizer_dir` (e.g. the folder the model was loaded from) supplies the
  tokenizer / processor files to copy alongside. On several hosts every process must call this; process 0 writes.
  """
  np_dtype = np.dtype(jnp.dtype(dtype))
  specs = _leaf_specs(config, "model.language_model.", "model.visual.")
  tensors = []
  for path, leaf in specs.items():
    value = _tree_get(params, path)
    for i, name in enumerate(leaf.names):
      stored_shape = _stored_shape(leaf, value.shape, config)
      tensors.append(
          (name, stored_shape, np_dtype, lambda value=value, i=i, leaf=leaf, stored_shape=stored_shape: _to_stored(
              _host_array(value[i] if leaf.stacked else value), leaf.layout, stored_shape)))
  if jax.process_index() != 0:
    for *_, produce in tensors:  # every process joins the gathers of non-addressable leaves
      produce()
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  shards, current, size = [], [], 0
  for tensor in tensors:
    nbytes = int(np.prod(tensor[1], dtype=np.int64)) * np_dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(tensor)
    size += nbytes
  shards.append(current)
  if len(shards) == 1:
    _write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
  else:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      _write_safetensors(os.path.join(out_dir, file), shard)
      for name, shape, *_ in shard:
        weight_map[name] = file
        total += int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_lib.to_hf_config(config, torch_dtype=np_dtype.name), f, indent=2)
  if tokenizer_dir is not None:
    for file in _TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_dir, file)):
        shutil.copy(os.path.join(tokenizer_dir, file), os.path.join(out_dir, file))
  return out_dir


def _stored_shape(leaf: _Leaf, shape: tuple[int, ...], config: Qwen25VLConfig) -> tuple[int, ...]:
  inner = tuple(shape[1:]) if leaf.stacked else tuple(shape)
  if leaf.layout == "transpose":
    return inner[::-1]
  if leaf.layout == "conv":
    v = config.vision
    return (inner[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  return inner


def _to_stored(array: np.ndarray, layout: str, stored_shape: tuple[int, ...]) -> np.ndarray:
  if layout == "transpose":
    return array.T
  if layout == "conv":
    return array.T.reshape(stored_shape)
  return array


def params_from_state_dict(state: dict[str, Any], config: Qwen25VLConfig, dtype=jnp.float32) -> dict[str, Any]:
  """Our params from an in-memory HF state dict (name -> array-like, e.g. a torch model's `state_dict()`)."""
  np_dtype = np.dtype(jnp.dtype(dtype))
  arrays = {name: _as_numpy(t) for name, t in state.items()}
  specs = _leaf_specs(config, *_prefixes(arrays))
  params: dict[str, Any] = {}
  for path, leaf in specs.items():
    parts = [_read_in_memory(arrays[n], leaf.layout) for n in leaf.names]
    value = np.stack(parts) if leaf.stacked else parts[0]
    _tree_set(params, path, jnp.asarray(value.astype(np_dtype)))
  return params


def _read_in_memory(array: np.ndarray, layout: str) -> np.ndarray:
  if layout == "transpose":
    return array.T
  if layout == "conv":
    return array.reshape(array.shape[0], -1).T
  return array


def _as_numpy(tensor) -> np.ndarray:
  if hasattr(tensor, "detach"):  # torch, without importing it
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16: go through float32 (exact)
      return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy()
  return np.asarray(tensor)
