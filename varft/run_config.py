"""The run config's start-up checks, and the library configs built from it.

`validate` fails at start, naming the key, on a value the run would otherwise trip over later; the library configs
(`GRPOConfig`, the task's `RolloutConfig`, ...) are built here once so that their own checks run before any weights
load.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from varft import environment, grpo, grpo_loss, sharding
from varft.preflight import ConfigError

_CHOICES = {
    "mode": ("train", "eval", "sft"),
    "sft.format": ("auto", "stepwise", "multiturn"),
    "sft.aggregation": grpo_loss.AGGREGATION_MODES,
    "sft.schedule": ("cosine", "linear", "constant"),
    "sft.think": ("gt", "step"),
    "plan_check": ("auto", "off"),
    "grpo.advantage": grpo_loss.ADVANTAGE_MODES,
    "grpo.aggregation": grpo_loss.AGGREGATION_MODES,
    "grpo.policy_loss": tuple(grpo_loss.POLICY_LOSSES),
    "optim.schedule": ("cosine", "linear", "constant"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}
_POSITIVE_INTS = ("total_steps", "grpo.epochs", "grpo.micro_batches", "grpo.logits_chunk", "rollout.num_samples",
                  "rollout.prompts_per_host", "log_every", "sft.batch_size", "sft.micro_batches")
_NON_NEGATIVE = ("grpo.beta", "grpo.eps_low", "grpo.eps_high", "grpo.tis_cap", "optim.learning_rate",
                 "optim.warmup_steps", "optim.weight_decay", "optim.max_grad_norm", "checkpoint_every", "samples_every",
                 "eval_every", "sft.steps", "sft.learning_rate", "sft.warmup_steps")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    if part not in value:
      raise ConfigError(f"config.{dotted} is missing: add it to the experiment config (see experiments/).")
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the key, on values the run would otherwise trip over later."""
  task = environment.get(_get(config, "task"))
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f"config.{key}={value!r} is not one of {choices}")
  for key in _POSITIVE_INTS:
    value = _get(config, key)
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.{key}={value!r} must be a positive integer")
  for key in _NON_NEGATIVE:
    value = _get(config, key)
    if not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f"config.{key}={value!r} must be a non-negative number")
  if not 0 <= config.grpo.eps_low < 1:
    raise ConfigError(f"config.grpo.eps_low={config.grpo.eps_low} must be in [0, 1)")
  if config.rollout.temperature <= 0:
    raise ConfigError(f"config.rollout.temperature={config.rollout.temperature} must be > 0")
  rows = config.rollout.prompts_per_host * config.rollout.num_samples
  if rows % config.grpo.micro_batches:
    raise ConfigError(f"config.grpo.micro_batches={config.grpo.micro_batches} must divide the rows per "
                      f"host (rollout.prompts_per_host x rollout.num_samples = {rows})")
  try:
    sharding.mesh_shape(dict(config.mesh), jax.device_count())
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  if config.sft.batch_size % config.sft.micro_batches:
    raise ConfigError(f"config.sft.micro_batches={config.sft.micro_batches} must divide config.sft.batch_size="
                      f"{config.sft.batch_size}")
  if config.mode == "sft" and config.sft.steps < 1:
    raise ConfigError("config.mode=sft runs config.sft.steps supervised updates: set --config.sft.steps=N (N > 0)")
  if config.sft.steps and not task.references:
    supervised = tuple(name for name in environment.TASKS if environment.get(name).references)
    raise ConfigError(f"config.sft.steps={config.sft.steps}: the supervised phase needs reference trajectories "
                      f"(config.task in {supervised}), not config.task={config.task!r}")
  if config.model.get("hf_dir") and not os.path.isdir(config.model.hf_dir):
    raise ConfigError(f"config.model.hf_dir={config.model.hf_dir!r} is not a folder: point it at a "
                      "downloaded Qwen2.5-VL checkpoint (config.json + *.safetensors)")
  # The library configs check their own fields (GRPOConfig, the task's RolloutConfig, ...): built here, at start.
  try:
    grpo_config(config)
    task.check_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def grpo_config(config: ml_collections.ConfigDict) -> grpo.GRPOConfig:
  """`grpo.GRPOConfig` from every `config.grpo` key it has a field for, at the sampling temperature."""
  fields = {f.name for f in dataclasses.fields(grpo.GRPOConfig)} - {"temperature"}
  return grpo.GRPOConfig(**{
      k: v for k, v in config.grpo.items() if k in fields
  }, temperature=config.rollout.temperature)
