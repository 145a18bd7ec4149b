"""Rewards as jittable batch ops.

Config: `config.rewards = [('accuracy', 1.0), ('format', 1.0)]` (names from `REGISTRY`), and
optionally `config.reward_options = dict(task='search'|'coding', similarity_threshold=0.5,
code_step_reward=0.9)`.

  arrays = prepare_reward_inputs(completions, references, names=...)   # host, numpy
  total, components = compute_rewards(arrays, weights)                 # device, jitted

or `score_batch(completions, references, config)` for both at once. Step-wise mode (the paper)
scores each step against its reference step; multi-turn mode scores the final turn ('answer_f1',
'answer_em', 'format') plus tool-call statistics ('tool_validity', 'failed_calls', 'code_success').
"""
from collections.abc import Mapping, Sequence
import functools
from typing import Any

import jax
import numpy as np

from varft.rewards import ops
from varft.rewards.gold import inject_gold
from varft.rewards.host import (
    Embedder,
    LexicalEmbedder,
    RewardOptions,
    default_embedder,
    parse_reference,
    prepare_reward_inputs,
    resolve_similarity,
)
from varft.rewards.ops import REGISTRY

__all__ = [
    "REGISTRY", "Embedder", "LexicalEmbedder", "RewardOptions", "compute_rewards", "default_embedder", "inject_gold",
    "options_from_config", "parse_reference", "prepare_reward_inputs", "resolve_similarity", "reward_weights",
    "score_batch"
]


def reward_weights(spec) -> tuple[tuple[str, float], ...]:
  """Normalises a reward spec (list of (name, weight) pairs, or a name -> weight mapping)."""
  pairs = spec.items() if hasattr(spec, "items") else spec  # a dict or a nested ConfigDict
  try:
    weights = tuple((str(name), float(weight)) for name, weight in pairs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"rewards must be (name, weight) pairs, e.g. [('accuracy', 1.0)]; got {spec!r}") from e
  unknown = [name for name, _ in weights if name not in REGISTRY]
  if unknown or not weights:
    raise ValueError(f"unknown or no rewards {unknown or spec!r}; known: {sorted(REGISTRY)}")
  return weights


@functools.partial(jax.jit, static_argnums=1)
def _compute(arrays, weights):
  components = {name: ops.batch_op(name)(arrays) * arrays["valid"] for name, _ in weights}
  total = sum(weight * components[name] for name, weight in weights)
  return total, components


def compute_rewards(arrays: Mapping[str, Any], weights) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total (B,), components {name: (B,)}); jitted, compiled once per bucket shape."""
  return _compute(dict(arrays), reward_weights(weights))


def options_from_config(config) -> RewardOptions:
  """RewardOptions from `config.reward_options` (absent: the paper's search-agent settings)."""
  given = dict(config.get("reward_options", None) or {}) if hasattr(config, "get") else {}
  unknown = set(given) - set(RewardOptions.__dataclass_fields__)
  if unknown:
    raise ValueError(f"unknown reward_options {sorted(unknown)}; known: {sorted(RewardOptions.__dataclass_fields__)}")
  return RewardOptions(**given)


def score_batch(completions: Sequence[str], references: Sequence[Mapping[str, Any]], config, *,
                step_types: Sequence[str] | None = None, embedder: Embedder | None = None,
                tool_stats: Mapping[str, Sequence] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Host adapter + jitted ops in one call; numpy (total (N,), components {name: (N,)})."""
  weights = reward_weights(config["rewards"])  # a dict or an ml_collections.ConfigDict
  arrays = prepare_reward_inputs(completions, references, names=[n for n, _ in weights], step_types=step_types,
                                 options=options_from_config(config), embedder=embedder, tool_stats=tool_stats)
  total, components = compute_rewards(arrays, weights)
  n = len(completions)
  return np.asarray(total)[:n], {k: np.asarray(v)[:n] for k, v in components.items()}
