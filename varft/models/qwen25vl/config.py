"""Qwen2.5-VL hyperparameters: presets by name and HF `config.json` in both layouts.

A config is a frozen (hashable) dataclass so that it can be a static argument of jitted functions.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

# Token ids of the Qwen2.5 vocabulary that the model itself depends on.
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653

# Text attention implementations (see attention.py; listed here so that the config needs no JAX import).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla_chunked", "dot_product", "cudnn", "pallas_flash", "reference")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 2048
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  in_channels: int = 3
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tokens_per_second: int = 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch: channels x temporal x patch x patch (1176 for Qwen2.5-VL)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_layers: int = 36
  num_heads: int = 16
  num_kv_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """The whole model. `dtype` is the compute dtype; `remat` rematerialises each layer in the backward pass;
  `attention` picks the text attention implementation (`attention.IMPLEMENTATIONS`; `auto` by backend)."""
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  image_token_id: int = IMAGE_TOKEN_ID
  video_token_id: int = VIDEO_TOKEN_ID
  vision_start_token_id: int = VISION_START_TOKEN_ID
  vision_end_token_id: int = VISION_END_TOKEN_ID
  dtype: str = "float32"
  remat: bool = False
  attention: str = "auto"

  def replace(self, **kwargs) -> Qwen25VLConfig:
    return dataclasses.replace(self, **kwargs)

  def __post_init__(self):
    _validate(self)


def _validate(config: Qwen25VLConfig) -> None:
  t, v = config.text, config.vision
  problems = []
  if t.hidden_size % t.num_heads:
    problems.append(f"text.hidden_size {t.hidden_size} is not divisible by text.num_heads {t.num_heads}")
  elif t.num_heads % t.num_kv_heads:
    problems.append(f"text.num_heads {t.num_heads} is not a multiple of text.num_kv_heads {t.num_kv_heads}")
  elif 2 * sum(t.mrope_section) != t.head_dim:
    problems.append(f"2 * sum(text.mrope_section {t.mrope_section}) must equal the head dim {t.head_dim}")
  if v.hidden_size % v.num_heads:
    problems.append(f"vision.hidden_size {v.hidden_size} is not divisible by vision.num_heads {v.num_heads}")
  elif v.head_dim % 4:
    problems.append(f"vision head dim {v.head_dim} must be a multiple of 4 (2-D rotary embedding)")
  if v.out_hidden_size != t.hidden_size:
    problems.append(f"vision.out_hidden_size {v.out_hidden_size} must equal text.hidden_size {t.hidden_size}")
  bad_blocks = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
  if bad_blocks:
    problems.append(f"vision.fullatt_block_indexes {bad_blocks} are outside 0..{v.depth - 1}")
  if config.dtype not in ("float32", "bfloat16", "float16"):
    problems.append(f"dtype {config.dtype!r} is not one of float32, bfloat16, float16")
  if config.attention not in ATTENTION_IMPLEMENTATIONS:
    problems.append(f"attention {config.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
  if problems:
    raise ValueError("Invalid Qwen2.5-VL config: " + "; ".join(problems))


PRESETS: dict[str, Qwen25VLConfig] = {
    # Small enough for unit tests and the CPU demo, with the real 151,936-token vocabulary.
    "tiny": Qwen25VLConfig(
        text=TextConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        mrope_section=(2, 3, 3), tie_word_embeddings=True, max_position_embeddings=32768),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                            fullatt_block_indexes=(1,)),
    ),
    # The published Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct hyperparameters.
    "3b": Qwen25VLConfig(
        text=TextConfig(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
                        tie_word_embeddings=True),
        vision=VisionConfig(out_hidden_size=2048),
    ),
    "7b": Qwen25VLConfig(
        text=TextConfig(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                        tie_word_embeddings=False),
        vision=VisionConfig(out_hidden_size=3584),
    ),
}


def get_config(name_or_path: str, **overrides: Any) -> Qwen25VLConfig:
  """A preset by name (`tiny`, `3b`, `7b`), or an HF checkpoint folder / `config.json` path."""
  if name_or_path in PRESETS:
    config = PRESETS[name_or_path]
  elif os.path.exists(name_or_path):
    config = from_hf_config(name_or_path)
  else:
    raise ValueError(f"Unknown Qwen2.5-VL model {name_or_path!r}: use one of {sorted(PRESETS)} "
                     "or the path of an HF checkpoint folder (or its config.json).")
  return config.replace(**overrides) if overrides else config


def from_hf_config(source: str | Mapping[str, Any]) -> Qwen25VLConfig:
  """Reads an HF Qwen2.5-VL config: a dict, a config.json path, or a checkpoint folder.

  Accepts both the transformers-5 nested layout (`text_config`, `rope_parameters`) and the legacy flat layout of
  hub folders (text keys at the top level, `rope_scaling.mrope_section`, `rope_theta`).
  """
  if isinstance(source, (str, os.PathLike)):
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.exists(path):
      raise FileNotFoundError(f"No HF config at {path}: expected a Qwen2.5-VL checkpoint folder with config.json.")
    with open(path) as f:
      raw = json.load(f)
  else:
    raw = dict(source)
  text = dict(raw)
  text.update(raw.get("text_config") or {})
  vision = raw.get("vision_config") or {}
  rope = dict(text.get("rope_scaling") or {})
  rope.update(text.get("rope_parameters") or {})
  try:
    mrope_section = tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24)))
    rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
    text_config = TextConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=int(text["num_attention_heads"]),
        num_kv_heads=int(text.get("num_key_value_heads", text["num_attention_heads"])),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        mrope_section=mrope_section,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
    )
    vision_config = VisionConfig(
        depth=int(vision["depth"]),
        hidden_size=int(vision["hidden_size"]),
        intermediate_size=int(vision["intermediate_size"]),
        num_heads=int(vision["num_heads"]),
        out_hidden_size=int(vision.get("out_hidden_size", text_config.hidden_size)),
        patch_size=int(vision.get("patch_size", 14)),
        temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        window_size=int(vision.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
        in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
        rms_norm_eps=float(vision.get("rms_norm_eps", 1e-6)),
        tokens_per_second=int(vision.get("tokens_per_second", 2)),
    )
  except KeyError as e:
    raise ValueError(f"HF config is missing the key {e.args[0]!r}: is this a Qwen2.5-VL config.json?") from None
  return Qwen25VLConfig(
      text=text_config,
      vision=vision_config,
      image_token_id=int(raw.get("image_token_id", IMAGE_TOKEN_ID)),
      video_token_id=int(raw.get("video_token_id", VIDEO_TOKEN_ID)),
      vision_start_token_id=int(raw.get("vision_start_token_id", VISION_START_TOKEN_ID)),
      vision_end_token_id=int(raw.get("vision_end_token_id", VISION_END_TOKEN_ID)),
  )


def to_hf_config(config: Qwen25VLConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
  """The transformers-5 nested `config.json` dict for `config`."""
  t, v = config.text, config.vision
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "image_token_id": config.image_token_id,
      "video_token_id": config.video_token_id,
      "vision_start_token_id": config.vision_start_token_id,
      "vision_end_token_id": config.vision_end_token_id,
      "tie_word_embeddings": t.tie_word_embeddings,
      "dtype": torch_dtype,
      "text_config": {
          "model_type": "qwen2_5_vl_text",
          "vocab_size": t.vocab_size,
          "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size,
          "num_hidden_layers": t.num_layers,
          "num_attention_heads": t.num_heads,
          "num_key_value_heads": t.num_kv_heads,
          "hidden_act": "silu",
          "rms_norm_eps": t.rms_norm_eps,
          "max_position_embeddings": t.max_position_embeddings,
          "rope_parameters": {
              "rope_type": "default",
              "rope_theta": t.rope_theta,
              "mrope_section": list(t.mrope_section)
          },
          "tie_word_embeddings": t.tie_word_embeddings,
          "use_sliding_window": False,
          "bos_token_id": 151643,
          "eos_token_id": 151645,
          "dtype": torch_dtype,
      },
      "vision_config": {
          "model_type": "qwen2_5_vl",
          "depth": v.depth,
          "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size,
          "num_heads": v.num_heads,
          "out_hidden_size": v.out_hidden_size,
          "patch_size": v.patch_size,
          "temporal_patch_size": v.temporal_patch_size,
          "spatial_merge_size": v.spatial_merge_size,
          "window_size": v.window_size,
          "fullatt_block_indexes": list(v.fullatt_block_indexes),
          "in_channels": v.in_channels,
          "hidden_act": "silu",
          "tokens_per_second": v.tokens_per_second,
          "dtype": torch_dtype,
      },
  }
