"""What a person sees of a run: a short start summary, one progress bar, an end-of-run summary.

The full config goes to `<workdir>/config.json`, not to the console. The bar shows step, reward and step time; when
stderr is not a terminal (a redirected log, a batch job) it becomes one plain line per logged step, with no
carriage returns or escape codes.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

import ml_collections


def write_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config as JSON and returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return path


def start_summary(config: ml_collections.ConfigDict, workdir: str, devices: Sequence[Any],
                  mesh_shape: Mapping[str, int], num_params: int, choices: Mapping[str, Any]) -> str:
  """A few lines naming what runs where: model, devices and mesh, rollout shape, rewards, outputs."""
  r = config.rollout
  model = config.model.hf_dir or config.model.name
  rewards = ", ".join(f"{name} x{weight:g}" for name, weight in config.rewards)
  extra = "".join(f"; {k}: {v}" for k, v in sorted(choices.items()))
  mesh = " x ".join(f"{k}={v}" for k, v in mesh_shape.items())
  return "\n".join([
      f"varft {config.mode}: {config.task} task, model {model} ({num_params / 1e6:.1f}M params, "
      f"{config.model.dtype} compute), {config.total_steps} steps",
      f"  devices: {len(devices)} x {devices[0].platform} (mesh {mesh})",
      f"  rollout: {r.mode}, {r.prompts_per_host} prompts x G={r.num_samples} per host, "
      f"<= {r.max_new_tokens} new tokens, {r.max_turns} turns",
      f"  rewards: {rewards}{extra}",
      f"  workdir: {workdir} (full config in config.json)",
  ])


class Progress:
  """One bar on a terminal (tqdm), plain lines elsewhere."""

  def __init__(self, total: int, initial: int, enabled: bool = True, stream=None):
    self._stream = stream or sys.stderr
    self._total = total
    self._bar = None
    self.enabled = enabled
    if enabled and self._stream.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc="train", file=self._stream, dynamic_ncols=True)

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    fields = f"reward={metrics.get('reward/mean', float('nan')):.3f} step={metrics.get('time/step_s', 0.0):.1f}s"
    if self._bar is not None:
      self._bar.set_postfix_str(fields, refresh=False)
      self._bar.update(1)
    else:
      print(f"train step {step}/{self._total} {fields}", file=self._stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def end_summary(workdir: str, history: Sequence[Mapping[str, float]], exported: str | None) -> str:
  """Steps run, reward first -> last, where the outputs are and how to look at them."""
  lines = ["varft: done"]
  if history:
    rewards = [row.get("reward/mean", float("nan")) for row in history]
    curve = " ".join(f"{r:.2f}" for r in rewards[-20:])
    lines.append(f"  steps {history[0]['step']}..{history[-1]['step']}: reward {rewards[0]:.3f} -> "
                 f"{rewards[-1]:.3f} (last {min(len(rewards), 20)}: {curve})")
  lines.append(f"  metrics: {os.path.join(workdir, 'metrics.jsonl')}; samples: {os.path.join(workdir, 'samples')}")
  if exported:
    lines.append(f"  HF export: {exported} (transformers-loadable, tokenizer and processor included)")
  lines.append(f"  TensorBoard: pip install tensorboard && tensorboard --logdir {os.path.join(workdir, 'tb')}")
  return "\n".join(lines)

