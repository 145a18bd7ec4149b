"""The whole Qwen2.5-VL model: vision tower + image-token merge + Qwen2 decoder, as pure functions.

Params are `{'text': <text tree>, 'vision': <vision tree>}` (see text.py / vision.py). Device functions take
static-shape arrays; `apply` is the HF-style convenience that takes what the HF processor produces (input_ids,
attention_mask, pixel_values, image_grid_thw), builds positions and index arrays on the host and runs one jitted
forward.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from varft import batch as batch_lib
from varft import sharding
from varft.models.qwen25vl import rope, text, vision
from varft.models.qwen25vl.config import Qwen25VLConfig

Params = dict[str, Any]


def compute_dtype(config: Qwen25VLConfig):
  return jnp.dtype(config.dtype)


# The logical axes of both towers' parameters, in `init_params`' tree (see text.PARAM_AXES, vision.PARAM_AXES).
PARAM_AXES: dict[str, Any] = {"text": text.PARAM_AXES, "vision": vision.PARAM_AXES}


def init_params(rng: jax.Array, config: Qwen25VLConfig, dtype=jnp.float32) -> Params:
  """Random parameters for both towers."""
  text_rng, vision_rng = jax.random.split(rng)
  return {
      "text": text.init_params(text_rng, config.text, dtype),
      "vision": vision.init_params(vision_rng, config.vision, dtype)
  }


def encode_images(params: Params, config: Qwen25VLConfig, pixel_values: jnp.ndarray,
                  vision_inputs: dict[str, Any]) -> jnp.ndarray:
  """Merged image embeddings (P/4, D) of the patches `pixel_values` (P, 1176), in the processor's order."""
  return vision.forward(params["vision"], config.vision, pixel_values, vision_inputs, dtype=compute_dtype(config),
                        remat=config.remat)


def image_index_for(input_ids, config: Qwen25VLConfig) -> np.ndarray:
  """(B, T) int32: the k-th image token of the batch (row-major order) gets k, every other token -1."""
  is_image = np.asarray(input_ids) == config.image_token_id
  return np.where(is_image, np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1, -1).astype(np.int32)


def embed(params: Params, config: Qwen25VLConfig, input_ids: jnp.ndarray, image_embeds: jnp.ndarray | None = None,
          image_index: jnp.ndarray | None = None) -> jnp.ndarray:
  """Token embeddings (B, T, D) with image tokens replaced by rows `image_index` of `image_embeds`: one table
  (M, D) for the whole batch, or per-device tables (devices, M, D) where each row reads its own device's table
  (`batch.lookup_images`, the training batch's layout)."""
  dtype = compute_dtype(config)
  embeds = text.embed_tokens(params["text"], input_ids, dtype)
  if image_embeds is None or image_index is None:
    return embeds
  if image_embeds.ndim == 3:
    rows = batch_lib.lookup_images(image_embeds.astype(dtype), image_index)
  else:
    rows = jnp.take(image_embeds, jnp.maximum(image_index, 0), axis=0, mode="clip").astype(dtype)
  rows = sharding.constrain(rows, ("batch", "length", "act_embed"))  # each device looks up its own rows' images
  return jnp.where((image_index >= 0)[..., None], rows, embeds)


def forward_hidden(params: Params, config: Qwen25VLConfig, input_ids: jnp.ndarray, positions: jnp.ndarray,
                   attention_mask: jnp.ndarray | None = None, image_embeds: jnp.ndarray | None = None,
                   image_index: jnp.ndarray | None = None,
                   cache: text.KVCache | None = None) -> tuple[jnp.ndarray, text.KVCache | None]:
  """Final-norm hidden states (B, T, D) and the updated KV cache (see `text.forward`)."""
  embeds = embed(params, config, input_ids, image_embeds, image_index)
  return text.forward(params["text"], config.text, embeds, positions, attention_mask=attention_mask, cache=cache,
                      dtype=compute_dtype(config), remat=config.remat, attention=config.attention)


def logits(params: Params, config: Qwen25VLConfig, hidden: jnp.ndarray) -> jnp.ndarray:
  """float32 vocabulary logits of hidden states."""
  return text.logits(params["text"], config.text, hidden)


@functools.partial(jax.jit, static_argnames=("config",))
def _apply_jit(params, config, input_ids, attention_mask, positions, pixel_values, vision_inputs, image_index):
  image_embeds = None
  if pixel_values is not None:
    image_embeds = encode_images(params, config, pixel_values, vision_inputs)
  hidden, _ = forward_hidden(params, config, input_ids, positions, attention_mask, image_embeds, image_index)
  return logits(params, config, hidden)


def prepare_inputs(config: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   num_patches_padded: int | None = None, num_key_blocks: int | None = None) -> dict[str, Any]:
  """Host side of `apply`: numpy arrays (positions, image index, vision index arrays) for the jitted forward."""
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}.")
  attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if (pixel_values is None) != (image_grid_thw is None):
    raise ValueError("pixel_values and image_grid_thw go together: pass both or neither.")
  grids = None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
  positions, _ = rope.sequence_positions(input_ids, grids, config, attention_mask)
  inputs = {
      "input_ids": input_ids.astype(np.int32),
      "attention_mask": attention_mask.astype(np.int32),
      "positions": positions,
      "pixel_values": None,
      "vision_inputs": None,
      "image_index": None
  }
  if grids is None:
    return inputs
  pixel_values = np.asarray(pixel_values, np.float32)
  real = vision.num_patches(grids)
  if pixel_values.shape[0] != real:
    raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes {real}.")
  merge = config.vision.spatial_merge_size ** 2
  image_index = image_index_for(input_ids, config)
  if int((image_index >= 0).sum()) != real // merge:
    raise ValueError(f"input_ids hold {(image_index >= 0).sum()} image tokens but the images give {real // merge}; "
                     "expand <|image_pad|> with the processor's image_grid_thw.")
  vision_inputs = vision.vision_inputs(grids, config.vision, num_patches_padded, num_key_blocks)
  padded = len(vision_inputs["full_segment"])
  inputs.update(pixel_values=np.pad(pixel_values, [(0, padded - real), (0, 0)]), vision_inputs=vision_inputs,
                image_index=image_index)
  return inputs


def apply(params: Params, config: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None,
          image_grid_thw=None, num_patches_padded: int | None = None, num_key_blocks: int | None = None) -> jnp.ndarray:
  """Logits (B, T, V) float32 for the arrays an HF Qwen2.5-VL processor produces (numpy, jax or torch-free lists).

  Positions (M-RoPE) and the window/segment index arrays are computed on the host; the forward is jitted and
  recompiles only for new shapes: pad `input_ids`, and fix `num_patches_padded` and `num_key_blocks` (see
  `vision.max_key_blocks`) to buckets to avoid that.
  """
  inputs = prepare_inputs(config, input_ids, attention_mask, pixel_values, image_grid_thw, num_patches_padded,
                          num_key_blocks)
  return _apply_jit(params, config, inputs["input_ids"], inputs["attention_mask"], inputs["positions"],
                    inputs["pixel_values"], inputs["vision_inputs"], inputs["image_index"])
