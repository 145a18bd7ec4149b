"""What the training loop needs from a task: rollouts scored into an `Experience`, evaluation, a data position."""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass
class Experience:
  """One step's rollouts on this host.

  batch: the rollout batch of `varft.batch` (numpy, this host's rows), including `group_ids` numbered 0..P-1 on
    every host; rewards: (N,) float32 totals; components: name -> (N,) reward parts; stats: host-side scalars
    (tool calls, errors, lengths, timings `time/..._s`); samples: readable transcripts for `write_samples`.
  """
  batch: dict[str, Any]
  rewards: np.ndarray
  components: dict[str, np.ndarray]
  stats: dict[str, float]
  samples: list[dict[str, Any]]


class Environment(Protocol):
  prompts_per_host: int
  num_samples: int

  def collect(self, params: Any, rng: Any) -> Experience:
    """Samples `num_samples` rollouts of `prompts_per_host` prompts with the current params and scores them."""

  def evaluate(self, params: Any, rng: Any, out_dir: str | None = None) -> dict[str, float]:
    """Evaluation metrics (`eval/...`); may write predictions under `out_dir`."""

  def data_state(self) -> dict[str, Any]:
    """The JSON-serialisable input position, saved in checkpoints."""

  def restore_data_state(self, state: dict[str, Any]) -> None:
    """Continues from a position returned by `data_state`."""
