"""Multimodal rotary position embedding (M-RoPE) of Qwen2.5-VL.

Host side (numpy): 3-D position ids (temporal, height, width) for any mix of text and images, whole sequences at once
(the equivalent of transformers' `get_rope_index`) or incrementally, chunk by chunk, as a rollout grows.
Device side (jax): the cos/sin tables, with the *chunked* `mrope_section` layout: the first `section[0]` frequency
pairs rotate with the temporal id, the next `section[1]` with the height id, the last `section[2]` with the width id.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from varft.models.qwen25vl.config import Qwen25VLConfig


def text_positions(start: int, length: int) -> tuple[np.ndarray, int]:
  """Positions of `length` text tokens starting at `start`: all three axes advance together."""
  pos = np.broadcast_to(np.arange(start, start + length, dtype=np.int32), (3, length)).copy()
  return pos, start + length


def image_positions(start: int, grid_thw, spatial_merge_size: int) -> tuple[np.ndarray, int]:
  """Positions of one image's merged tokens (row-major over t, h, w), and the next free position.

  Every axis is offset by `start`; the next position is the largest id used plus one, as in Qwen2.5-VL.
  """
  t, h, w = (int(x) for x in grid_thw)
  h, w = h // spatial_merge_size, w // spatial_merge_size
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  pos = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]).astype(np.int32) + start
  return pos, start + max(t, h, w)


def sequence_positions(input_ids: np.ndarray, image_grid_thw, config: Qwen25VLConfig,
                       attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """3-D positions `(3, B, T)` for a batch of token sequences, plus the per-row delta `next_position - length`.

  Runs of `image_token_id` are images, consumed in order from `image_grid_thw` (one row per image, across the
  batch, in order of appearance). Masked (padding) tokens get position 0, like transformers.
  """
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  grids = iter(np.asarray(image_grid_thw).reshape(-1, 3) if image_grid_thw is not None else ())
  merge = config.vision.spatial_merge_size
  positions = np.zeros((3, batch, length), np.int32)
  deltas = np.zeros((batch,), np.int32)
  for row in range(batch):
    ids = input_ids[row][mask[row]]
    is_image = ids == config.image_token_id
    chunks, next_pos, i = [], 0, 0
    while i < len(ids):
      j = i
      while j < len(ids) and is_image[j] == is_image[i]:
        j += 1
      if not is_image[i]:
        pos, next_pos = text_positions(next_pos, j - i)
        chunks.append(pos)
      else:
        # A run of image tokens may hold several consecutive images: consume grids until the run is covered.
        covered = 0
        while covered < j - i:
          try:
            grid = next(grids)
          except StopIteration:
            raise ValueError(f"Row {row} has more image tokens than image_grid_thw describes.") from None
          pos, next_pos = image_positions(next_pos, grid, merge)
          chunks.append(pos)
          covered += pos.shape[1]
        if covered != j - i:
          raise ValueError(f"Row {row}: a run of {j - i} image tokens does not match the image grids "
                           f"({covered} tokens); expand <|image_pad|> with the processor's image_grid_thw.")
      i = j
    row_pos = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int32)
    positions[:, row, mask[row]] = row_pos
    deltas[row] = next_pos - len(ids)
  if next(grids, None) is not None:
    raise ValueError("image_grid_thw describes more images than the input_ids contain.")
  return positions, deltas


def inverse_frequencies(head_dim: int, theta: float) -> jnp.ndarray:
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_cos_sin(positions: jnp.ndarray, head_dim: int, theta: float,
                  mrope_section: tuple[int, int, int]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos, sin of shape `(B, T, head_dim)` (float32) for 3-D positions `(3, B, T)`."""
  freqs = positions.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)  # (3, B, T, hd/2)
  bounds = np.cumsum((0,) + tuple(mrope_section))
  freqs = jnp.concatenate([freqs[axis, ..., bounds[axis]:bounds[axis + 1]] for axis in range(3)], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates `x` (..., T, heads, head_dim) by cos/sin (..., T, head_dim), computing in float32."""
  xf = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
