"""The evaluation engine's settings (`config.eval` over `config.rollout`) and what each result records of them.

`config.eval` keys (defaults: varft's chat evaluation; the experiment files' `,paper` section: the released scripts'):
  layout ('chat' | 'single_turn'), agent_rules ('varft' | 'paper'), stop_at ('closing_tag' | 'eos'),
  repetition_penalty (1 = off), crop_override, image_prefit: the `varft.rollout.RolloutConfig` fields of the same name;
  max_new_tokens, max_total_tokens: per turn / per trajectory (0: the rollout's; larger ones add length buckets);
  image_max_pixels: 0 the rollout's, -1 the checkpoint's processor (`model.hf_dir`'s preprocessor_config.json, the
  rollout's without one), else that many; resize: -1 as `data.resize` (the training inputs' square), 0 none (each
  image keeps its aspect ratio), else that square.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections

from varft.processing import image as image_lib

ENGINE_KEYS = ("layout", "agent_rules", "stop_at", "repetition_penalty", "crop_override", "image_prefit")


def image_pixels(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(min_pixels, max_pixels) of an evaluation image."""
  chosen, rollout = config.eval.image_max_pixels, config.rollout
  if chosen == -1:
    hf_dir = config.model.hf_dir
    if hf_dir and os.path.exists(os.path.join(hf_dir, "preprocessor_config.json")):
      settings = image_lib.processor_settings(hf_dir)
      return settings["min_pixels"], settings["max_pixels"]
    return rollout.image_min_pixels, rollout.image_max_pixels
  return rollout.image_min_pixels, chosen or rollout.image_max_pixels


def _grown(buckets, needed: int) -> tuple[int, ...]:
  """`buckets` doubled from the largest until one holds `needed` (a few more shapes, none much too large)."""
  buckets = tuple(buckets)
  while max(buckets) < needed:
    buckets += (2 * max(buckets),)
  return buckets


def rollout_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `RolloutConfig` fields the evaluation engine sets over `config.rollout`."""
  e, r = config.eval, config.rollout
  out = {"mode": "multiturn", "temperature": e.temperature, "max_turns": e.max_turns, **{k: e[k] for k in ENGINE_KEYS}}
  if e.max_new_tokens:
    out["max_new_tokens"] = e.max_new_tokens
  total = e.max_total_tokens or r.max_total_tokens
  if e.max_total_tokens:
    out["max_total_tokens"] = total
    out["length_buckets"] = _grown(r.length_buckets, total)
  out["image_min_pixels"], out["image_max_pixels"] = image_pixels(config)
  out["patch_buckets"] = _grown(r.patch_buckets, out["image_max_pixels"] // (14 * 14))
  return out


def eval_resize(config: ml_collections.ConfigDict) -> int:
  """The square evaluation images are resized to (0: none)."""
  return config.data.resize if config.eval.resize == -1 else config.eval.resize


def describe(config: ml_collections.ConfigDict, search_backend) -> dict[str, Any]:
  """What a result records about how it was produced: the search backend and the eval settings."""
  overrides = rollout_overrides(config)
  keys = ENGINE_KEYS + ("max_new_tokens", "max_total_tokens", "image_min_pixels", "image_max_pixels")
  settings = {k: overrides.get(k, config.rollout.get(k)) for k in keys}
  settings.update(search_backend=getattr(search_backend, "name", None), search_format=config.tools.search_format,
                  search_topk=config.tools.topk, resize=eval_resize(config), temperature=config.eval.temperature)
  return settings
