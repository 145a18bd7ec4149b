"""The Qwen2.5-VL vision tower as pure functions over a parameter pytree.

Patches (P, 1176) -> patch embedding (the stride-(2,14,14) Conv3d as a matmul) -> blocks (RMSNorm, attention with
2-D rotary embedding, RMSNorm, SwiGLU MLP with biases) -> merger (RMSNorm, 2x2 concat, Linear, exact GELU, Linear)
-> (P/4, D_text) image embeddings.

Most blocks attend within windows of 112x112 px (4x4 merged cells); `fullatt_block_indexes` attend within the whole
image. Inside the tower the patches are in *window order* (each window's cells contiguous); the output is put back
in the processor's order. All index and segment arrays come from `vision_inputs` (host numpy, static shapes), so
nothing loops over windows or images inside jit (the attention itself is `block_attention`):

* the sequence is cut into blocks of `B = (window_size / patch_size)**2` patches (one full window); each query block
  attends, with an online softmax scanned over key blocks, only to a static list of key blocks, masked by segment id;
* window attention: a window spans at most two blocks, so the key blocks are the block itself and its neighbours;
* full attention: the key blocks covering the image (frame) of the query block, listed on the host
  (`full_key_blocks`); its static length bounds the compute by the largest image, not by the whole batch;
* padded patches get segment 0 (their own group), so they never touch real ones.

Parameters (blocks stacked along a leading axis and run with `lax.scan`):

    patch_embed: {w (1176, Dv)}
    blocks: norm1 (L, Dv); qkv: {w (L, Dv, 3Dv), b (L, 3Dv)}; proj: {w (L, Dv, Dv), b (L, Dv)}; norm2 (L, Dv);
            gate/up: {w (L, Dv, F), b (L, F)}; down: {w (L, F, Dv), b (L, Dv)}
    merger: norm (Dv,); fc1: {w (4Dv, 4Dv), b (4Dv,)}; fc2: {w (4Dv, D_text), b (D_text,)}

Their logical axes (`PARAM_AXES`, beside `init_params`) say how they are sharded.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from varft import sharding
from varft.models.qwen25vl import block_attention, rope
from varft.models.qwen25vl.config import VisionConfig
from varft.models.qwen25vl.text import rms_norm

Params = dict[str, Any]

_INTERNAL_PAD = -1  # segment id of the internal padding up to a whole number of blocks
FULL_ATTENTION_CHUNK = 4  # key blocks per online-softmax step in full attention

# The logical axes of every parameter `init_params` creates, in its tree; `sharding` maps them to mesh axes by the
# config's rules. Norm scales and the biases added to the residual stream name no axes: small, they stay whole.
PARAM_AXES: dict[str, Any] = {
    "patch_embed": {
        "w": (None, "embed")
    },
    "blocks": {
        "norm1": (None, None),
        "qkv": {
            "w": ("layers", "embed", "heads"),
            "b": ("layers", "heads")
        },
        "proj": {
            "w": ("layers", "heads", "embed"),
            "b": (None, None)
        },
        "norm2": (None, None),
        "gate": {
            "w": ("layers", "embed", "mlp"),
            "b": ("layers", "mlp")
        },
        "up": {
            "w": ("layers", "embed", "mlp"),
            "b": ("layers", "mlp")
        },
        "down": {
            "w": ("layers", "mlp", "embed"),
            "b": (None, None)
        },
    },
    "merger": {
        "norm": (None,),
        "fc1": {
            "w": ("embed", "mlp"),
            "b": ("mlp",)
        },
        "fc2": {
            "w": ("mlp", "embed"),
            "b": (None,)
        },
    },
}


def init_params(rng: jax.Array, cfg: VisionConfig, dtype=jnp.float32) -> Params:
  """Random parameters (normal, std 0.02; zero biases; unit norms)."""
  d, f, nl, unit = cfg.hidden_size, cfg.intermediate_size, cfg.depth, cfg.spatial_merge_size ** 2
  keys = iter(jax.random.split(rng, 9))

  def normal(shape):
    return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

  def zeros(*shape):
    return jnp.zeros(shape, dtype)

  return {
      "patch_embed": {
          "w": normal((cfg.patch_dim, d))
      },
      "blocks": {
          "norm1": jnp.ones((nl, d), dtype),
          "qkv": {
              "w": normal((nl, d, 3 * d)),
              "b": zeros(nl, 3 * d)
          },
          "proj": {
              "w": normal((nl, d, d)),
              "b": zeros(nl, d)
          },
          "norm2": jnp.ones((nl, d), dtype),
          "gate": {
              "w": normal((nl, d, f)),
              "b": zeros(nl, f)
          },
          "up": {
              "w": normal((nl, d, f)),
              "b": zeros(nl, f)
          },
          "down": {
              "w": normal((nl, f, d)),
              "b": zeros(nl, d)
          },
      },
      "merger": {
          "norm": jnp.ones((d,), dtype),
          "fc1": {
              "w": normal((unit * d, unit * d)),
              "b": zeros(unit * d)
          },
          "fc2": {
              "w": normal((unit * d, cfg.out_hidden_size)),
              "b": zeros(cfg.out_hidden_size)
          },
      },
  }


def window_cells(cfg: VisionConfig) -> int:
  """Merged cells along one side of an attention window (112 px / 14 px / 2 = 4)."""
  return cfg.window_size // cfg.spatial_merge_size // cfg.patch_size


def block_patches(cfg: VisionConfig) -> int:
  """Patches in one full window: the block length of the banded window attention."""
  return (window_cells(cfg) * cfg.spatial_merge_size) ** 2


def num_patches(image_grid_thw) -> int:
  grids = np.asarray(image_grid_thw).reshape(-1, 3)
  return int(np.prod(grids, axis=1).sum())


def vision_inputs(image_grid_thw, cfg: VisionConfig, num_patches_padded: int | None = None,
                  num_key_blocks: int | None = None) -> dict[str, np.ndarray]:
  """Host-built index arrays for `forward` over the images of `image_grid_thw` (N, 3), patches concatenated in order.

  `num_patches_padded` (a multiple of merge**2, at least the real count) fixes the static size P; padded patches
  follow the real ones. `num_key_blocks` fixes the static number K of key blocks a query block visits in full
  attention (see `max_key_blocks`); by default K is all blocks when P is fixed (static, dense cost) and the least
  needed otherwise. Returns, with M = P / merge**2 merged cells and nb = ceil(P / B) blocks:

    window_order (M,) int32     cell (original order) at each window-order slot; padding cells stay at the end
    window_inverse (M,) int32   window-order slot of each original cell
    window_segment (P,) int32   window id (>= 1) of each window-ordered patch, 0 for padding
    full_segment (P,) int32     image frame id (>= 1) of each window-ordered patch, 0 for padding
    rotary_ids (P, 2) int32     (row, column) patch coordinates of each window-ordered patch
    full_key_blocks (nb, K) int32  key blocks of each query block in full attention; nb marks "none"
  """
  grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  merge, ws = cfg.spatial_merge_size, window_cells(cfg)
  unit = merge * merge
  real = num_patches(grids)
  padded = real if num_patches_padded is None else int(num_patches_padded)
  if padded < real or padded % unit:
    raise ValueError(f"num_patches_padded={padded} must be a multiple of {unit} and at least the {real} patches of "
                     f"image_grid_thw.")
  if np.any(grids[:, 1:] % merge):
    raise ValueError(f"image_grid_thw {grids.tolist()} has a side that is not a multiple of {merge}.")

  cells, windows, frames, rows, cols = [], [], [], [], []
  cell_offset = window_offset = frame_offset = 0
  for t, h, w in grids.tolist():
    hc, wc = h // merge, w // merge
    nh, nw = -(-hc // ws), -(-wc // ws)
    index = np.full((t, nh * ws, nw * ws), -1, np.int64)
    index[:, :hc, :wc] = np.arange(t * hc * wc).reshape(t, hc, wc)
    index = index.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(-1)
    keep = index >= 0
    cells.append(index[keep] + cell_offset)
    windows.append(np.repeat(np.arange(t * nh * nw), ws * ws)[keep] + window_offset)
    frames.append(np.repeat(np.arange(t), nh * nw * ws * ws)[keep] + frame_offset)
    # Patch coordinates in the processor's merge-block order: (t, h/m, w/m, m, m).
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (hc, merge, wc, merge)
    rows.append(np.tile(hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1), t))
    cols.append(np.tile(ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1), t))
    cell_offset += t * hc * wc
    window_offset += t * nh * nw
    frame_offset += t

  real_cells, total_cells = real // unit, padded // unit
  order = np.concatenate(cells + [np.arange(real_cells, total_cells)]).astype(np.int32)
  inverse = np.argsort(order).astype(np.int32)
  pad_cells = total_cells - real_cells
  window_of_cell = np.concatenate(windows + [np.full(pad_cells, -1)]) + 1
  frame_of_cell = np.concatenate(frames + [np.full(pad_cells, -1)]) + 1
  patch_rows = np.concatenate(rows + [np.zeros(padded - real, np.int64)]).reshape(-1, unit)[order].reshape(-1)
  patch_cols = np.concatenate(cols + [np.zeros(padded - real, np.int64)]).reshape(-1, unit)[order].reshape(-1)
  full_segment = np.repeat(frame_of_cell, unit).astype(np.int32)
  if num_key_blocks is None and num_patches_padded is not None:
    num_key_blocks = -(-padded // block_patches(cfg))
  return {
      "window_order": order,
      "window_inverse": inverse,
      "window_segment": np.repeat(window_of_cell, unit).astype(np.int32),
      "full_segment": full_segment,
      "rotary_ids": np.stack([patch_rows, patch_cols], axis=1).astype(np.int32),
      "full_key_blocks": _full_key_blocks(full_segment, block_patches(cfg), num_key_blocks),
  }


def _full_key_blocks(segment: np.ndarray, block: int, num_key_blocks: int | None) -> np.ndarray:
  """For each query block, the contiguous run of blocks spanning every segment (frame) it holds, padded with nb."""
  nb = -(-len(segment) // block)
  blocks = np.arange(len(segment)) // block
  real = segment > 0
  first = np.full(segment.max(initial=0) + 1, nb)
  last = np.full(segment.max(initial=0) + 1, -1)
  np.minimum.at(first, segment[real], blocks[real])
  np.maximum.at(last, segment[real], blocks[real])
  lo, hi = np.arange(nb), np.arange(nb)  # blocks without real patches visit only themselves
  np.minimum.at(lo, blocks[real], first[segment[real]])
  np.maximum.at(hi, blocks[real], last[segment[real]])
  needed = int((hi - lo).max(initial=0)) + 1
  count = needed if num_key_blocks is None else int(num_key_blocks)
  if count < needed:
    raise ValueError(f"num_key_blocks={count} is too small: these images need {needed} key blocks of {block} "
                     f"patches (see max_key_blocks).")
  run = lo[:, None] + np.arange(count)[None, :]
  return np.where(run <= hi[:, None], run, nb).astype(np.int32)


def max_key_blocks(max_image_patches: int, cfg: VisionConfig) -> int:
  """A static `num_key_blocks` enough for any batch whose images have at most `max_image_patches` patches each
  (e.g. max_pixels // 14**2): a query block can touch the end of one image and the start of another."""
  block = block_patches(cfg)
  return -(-(2 * max_image_patches + block) // block) + 1


def rotary_cos_sin(rotary_ids: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
  """2-D rotary tables (P, head_dim): the first quarter of frequencies turn with the row, the second with the
  column, and the halves repeat (rotate-half layout)."""
  inv_freq = rope.inverse_frequencies(head_dim // 2, theta)  # (head_dim / 4,)
  freqs = rotary_ids.astype(jnp.float32)[:, :, None] * inv_freq  # (P, 2, head_dim / 4)
  freqs = freqs.reshape(freqs.shape[0], -1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _dense(x, p, dtype):
  return x @ p["w"].astype(dtype) + p["b"].astype(dtype)


def _block(cfg: VisionConfig, dtype, block_len, x, layer_params, is_full, cos, sin, segments, key_blocks):
  length, d = x.shape
  heads = cfg.num_heads
  x = sharding.constrain(x, ("patches", "act_embed"))
  h = rms_norm(x, layer_params["norm1"], cfg.rms_norm_eps)
  qkv = _dense(h, layer_params["qkv"], dtype).reshape(length, 3, heads, d // heads)
  q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
  q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
  attend = block_attention.blocked_attention
  attn = jax.lax.cond(is_full,
                      lambda q, k, v: attend(q, k, v, segments[1], key_blocks[1], block_len, FULL_ATTENTION_CHUNK),
                      lambda q, k, v: attend(q, k, v, segments[0], key_blocks[0], block_len, 3), q, k, v)
  x = x + _dense(attn.reshape(length, d), layer_params["proj"], dtype)
  h = rms_norm(x, layer_params["norm2"], cfg.rms_norm_eps)
  mlp = jax.nn.silu(_dense(h, layer_params["gate"], dtype)) * _dense(h, layer_params["up"], dtype)
  mlp = sharding.constrain(mlp, ("patches", "act_mlp"))
  return sharding.constrain(x + _dense(mlp, layer_params["down"], dtype), ("patches", "act_embed"))


def forward(params: Params, cfg: VisionConfig, pixel_values: jnp.ndarray, inputs: dict[str, Any], dtype=jnp.float32,
            remat: bool = False) -> jnp.ndarray:
  """Image embeddings (P / merge**2, out_hidden_size) of `pixel_values` (P, 1176), in the processor's cell order.

  `inputs` is `vision_inputs(image_grid_thw, cfg, P, ...)` (numpy or device arrays). Rows of padded cells are
  meaningless but finite.
  """
  length = pixel_values.shape[0]
  unit = cfg.spatial_merge_size ** 2
  block_len = block_patches(cfg)
  padded = -(-length // block_len) * block_len

  x = pixel_values.astype(dtype) @ params["patch_embed"]["w"].astype(dtype)
  x = jnp.take(x.reshape(length // unit, unit, -1), inputs["window_order"], axis=0).reshape(length, -1)
  cos, sin = rotary_cos_sin(jnp.asarray(inputs["rotary_ids"]), cfg.head_dim, cfg.rope_theta)

  def pad(a, value):
    return jnp.pad(jnp.asarray(a), [(0, padded - length)] + [(0, 0)] * (a.ndim - 1), constant_values=value)

  x, cos, sin = pad(x, 0), pad(cos, 1), pad(sin, 0)
  segments = (pad(inputs["window_segment"], _INTERNAL_PAD), pad(inputs["full_segment"], _INTERNAL_PAD))
  key_blocks = (block_attention.window_key_blocks(padded // block_len), jnp.asarray(inputs["full_key_blocks"]))
  is_full = jnp.zeros((cfg.depth,), bool).at[jnp.array(cfg.fullatt_block_indexes, jnp.int32)].set(True)

  def body(x, scanned):
    layer_params, layer_is_full = scanned
    return _block(cfg, dtype, block_len, x, layer_params, layer_is_full, cos, sin, segments, key_blocks), None

  if remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  x, _ = jax.lax.scan(body, x, (params["blocks"], is_full))

  merger = params["merger"]
  x = rms_norm(x[:length], merger["norm"], cfg.rms_norm_eps).reshape(length // unit, -1)
  x = jax.nn.gelu(_dense(x, merger["fc1"], dtype), approximate=False)
  x = _dense(x, merger["fc2"], dtype)
  return jnp.take(x, inputs["window_inverse"], axis=0)
