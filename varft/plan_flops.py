"""Analytic FLOPs of the device programs of one step (multiply-adds count 2; the whole program, all devices).

XLA's `cost_analysis` counts the body of a `lax.scan` once, not once per layer, so the counts are written here:

  text, per token at context S (keys the kernel computes against, masked or not):
      2 * layers * (D * hd * (2 H + 2 KV) + 3 D F)        q, k, v, o projections and the gated MLP
    + 4 * layers * H * hd * S                             scores and weighted values
  logits, per position that gets them:  2 * D * V    (decode steps, loss slots; prefill and extend pass the
                                                    last hidden state on: the scheduler's next-token state)
  vision, per patch (Dv, Fv; 64-patch blocks; a window query block visits 3 key blocks, a full one K):
      2 * 1176 * Dv + 2 * depth * (4 Dv^2 + 3 Dv Fv)      patch embedding, qkv + proj, gated MLP
    + 4 * Dv * 64 * (3 * window layers + K * full layers)
    + 2 * (16 Dv^2 + 4 Dv D) / 4                          the merger, per merged cell of 4 patches
  train step: forward + backward = 3 x forward, + 1 forward recomputed under remat (text, logits and vision).
"""
from __future__ import annotations

from varft.models.qwen25vl import vision


def text_token_flops(t, context: int) -> float:
  dense = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads) + 3 * t.hidden_size * t.intermediate_size
  return 2.0 * t.num_layers * dense + 4.0 * t.num_layers * t.num_heads * t.head_dim * context


def logits_flops(t) -> float:
  return 2.0 * t.hidden_size * t.vocab_size


def vision_flops(model_cfg, patches: int, key_blocks: int) -> float:
  v, d = model_cfg.vision, model_cfg.text.hidden_size
  dv, block = v.hidden_size, vision.block_patches(v)
  full = len(v.fullatt_block_indexes)
  per_patch = (2.0 * v.patch_dim * dv + 2.0 * v.depth * (4 * dv * dv + 3 * dv * v.intermediate_size) +
               4.0 * dv * block * (3 * (v.depth - full) + key_blocks * full) + 2.0 *
               (16 * dv * dv + 4 * dv * d) / v.spatial_merge_size ** 2)
  return per_patch * patches


def program_flops(name: str, rec, model_cfg, config, tables: dict[str, tuple[int, int]]) -> float:
  """FLOPs of program `name` (see the module docstring) for the recipe `rec`; `tables` gives (padded patches,
  full-attention key blocks) of the image tables of the training batch (`batch`), of the prefill's prompts
  (`prefill`) and of the observation extend (`extend`), patches summed over the devices' tables, and the prefill's
  prompt rows (`prompt_rows`: (P, 0))."""
  t = model_cfg.text
  n, length = rec.rows, rec.train_len
  images = {k: vision_flops(model_cfg, *v) for k, v in tables.items() if k != "prompt_rows"}
  if name == "sampling_weights":  # a cast and a reshard: no multiply-adds
    return 0.0
  if name == "encode_images":
    return images["prefill"]
  if name == "prefill":  # each prompt once, into a fresh cache of the chunk's length; its images encoded inside
    prompts = tables["prompt_rows"][0]
    return prompts * rec.prompt_len * text_token_flops(t, rec.prompt_len) + images.get("prefill", 0.0)
  if name == "extend":  # an observation chunk on every row, its images encoded inside
    return n * rec.chunk_len * text_token_flops(t, rec.cache_len) + images.get("extend", 0.0)
  if name == "generate":
    return n * rec.new_tokens * (text_token_flops(t, rec.cache_len) + logits_flops(t))
  text_forward = n * length * text_token_flops(t, length) + n * rec.row_loss_tokens * logits_flops(t)
  image_forward = images.get("batch", 0.0)
  if name == "reference_logps":
    return text_forward + image_forward
  if name == "train_step":
    passes = 4.0 if model_cfg.remat else 3.0
    return passes * text_forward + (passes if config.grpo.train_vision else 1.0) * image_forward
  raise ValueError(f"Unknown program {name!r}")
