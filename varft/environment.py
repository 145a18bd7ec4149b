"""Tasks by name: what the training loop and eval need from one, and the registry `config.task` is looked up in.

    spec = environment.get(config.task)         # TaskSpec: its model config, text-only or not, its constructor
    task = spec.build(config, model_cfg, mesh, workdir)   # eval needs only this (and the parameters)
    batches = task.train_data()                 # training also opens its prompts (resumable: get/set_state)
    experience = task.collect(params, rng, batches)
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
from typing import Any, Protocol

import ml_collections
import numpy as np


class SampleRejected(ValueError):
  """One sample (an example, a reference) that cannot be used: the task skips it, counts it and logs it. Any other
  error is a bug and propagates."""


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


class TrainData(Protocol, Iterator):
  """A task's training prompts: an iterator whose JSON-serialisable position is saved in checkpoints."""

  def get_state(self) -> dict[str, Any]:
    ...

  def set_state(self, state: dict[str, Any]) -> None:
    ...


class Task(Protocol):
  prompts_per_host: int
  num_samples: int

  def train_data(self) -> TrainData:
    """Opens the training prompts (only a training run calls it: eval needs no training data)."""

  def collect(self, params: Any, rng: Any, batches: TrainData) -> Experience:
    """Samples `num_samples` rollouts of the next `prompts_per_host` prompts of `batches` and scores them."""

  def evaluate(self, params: Any, rng: Any, out_dir: str | None = None) -> dict[str, float]:
    """Evaluation metrics (`eval/...`); may write predictions under `out_dir`."""

  def close(self) -> None:
    """Releases what the task started (tool worker threads, the sandbox)."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """model_config: config -> the policy's Qwen25VLConfig (before `config.model`'s dtype/remat/attention);
  text_only: the policy has no vision tower and prompts carry no images; build: (config, model_cfg, mesh, workdir)
  -> the Task; references: its data has reference trajectories (a supervised warm-up can run); check_config: the
  task's part of `run_config.validate` (raises ValueError on a bad value)."""
  model_config: Callable[[ml_collections.ConfigDict], Any]
  text_only: bool
  build: Callable[..., Task]
  references: bool = False
  check_config: Callable[[ml_collections.ConfigDict], None] = lambda config: None


def _agent() -> TaskSpec:
  from varft import agent_task
  return TaskSpec(agent_task.model_config, False, agent_task.AgentEnvironment, references=True,
                  check_config=agent_task.check_config)


def _echo() -> TaskSpec:
  from varft import echo_task
  return TaskSpec(echo_task.config_model, True, echo_task.EchoEnvironment.from_config)


# name -> the TaskSpec (imported on lookup: the agent task pulls in the tools, data and rewards).
TASKS: dict[str, Callable[[], TaskSpec]] = {"agent": _agent, "echo": _echo}


def get(name: str) -> TaskSpec:
  """The task `name` (`config.task`); an unknown name is a `preflight.ConfigError` naming the known ones."""
  if name not in TASKS:
    from varft.preflight import ConfigError
    raise ConfigError(f"config.task={name!r} is not one of {tuple(TASKS)}")
  return TASKS[name]()
