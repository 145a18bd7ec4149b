"""What a person sees of a run: a short start summary, one progress bar, an end-of-run summary.

The full config goes to `<workdir>/config.json`, not to the console. The bar shows step, reward and step time; when
stderr is not a terminal (a redirected log, a batch job) it becomes one plain line per logged step, with no
carriage returns or escape codes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
import sys
from typing import Any

import ml_collections
import numpy as np


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
      f"{config.model.dtype} compute), {_steps(config)}",
      f"  devices: {len(devices)} x {devices[0].platform} (mesh {mesh})",
      f"  rollout: {r.mode}, {r.prompts_per_host} prompts x G={r.num_samples} per host, "
      f"<= {r.max_new_tokens} new tokens, {r.max_turns} turns",
      f"  rewards: {rewards}{extra}",
      f"  workdir: {workdir} (full config in config.json)",
  ])


def _steps(config: ml_collections.ConfigDict) -> str:
  sft = config.get("sft", {}).get("steps", 0)
  if config.mode == "sft":
    return f"{sft} supervised steps"
  return f"{sft} supervised warm-up steps, then {config.total_steps} GRPO steps" if sft else \
      f"{config.total_steps} steps"


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
    score = (f"sft_loss={metrics['sft/nll_per_token']:.3f}"
             if "sft/nll_per_token" in metrics else f"reward={metrics.get('reward/mean', float('nan')):.3f}")
    fields = f"{score} step={metrics.get('time/step_s', 0.0):.1f}s"
    if self._bar is not None:
      self._bar.set_postfix_str(fields, refresh=False)
      self._bar.update(1)
    else:
      print(f"train step {step}/{self._total} {fields}", file=self._stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values))


def phase_lines(history: Sequence[Mapping[str, float]], sft_steps: int, window: int = 3) -> list[str]:
  """For a run with a supervised warm-up: SFT loss first -> mean of the last 10 updates; GRPO's mean reward over its
  first and last `window` steps with the std between those steps (the noise a rise has to beat) and the rise in
  units of their pooled std; "at the end": the format reward over the last `window` GRPO steps' rollouts (and the
  last step's alone, which is only its own rollouts)."""
  lines = []
  sft_rows = [r for r in history if r["step"] <= sft_steps and "sft/nll_per_token" in r]
  if sft_rows:
    tail = sft_rows[-10:]
    lines.append(f"  SFT steps 1..{sft_rows[-1]['step']}: loss per token {sft_rows[0]['sft/nll_per_token']:.3f} -> "
                 f"{np.mean([r['sft/nll_per_token'] for r in tail]):.3f} (mean of the last {len(tail)}; token prob "
                 f"{np.mean([r['sft/token_prob'] for r in tail]):.2f})")
  rl = [r for r in history if r["step"] > sft_steps and "reward/mean" in r]
  if len(rl) >= 2 * window:
    first, first_std = _mean_std([r["reward/mean"] for r in rl[:window]])
    last, last_std = _mean_std([r["reward/mean"] for r in rl[-window:]])
    pooled = float(np.sqrt((first_std ** 2 + last_std ** 2) / 2))
    rise = f"{(last - first) / pooled:+.1f} x their pooled std" if pooled > 0 else "no spread between steps"
    lines.append(f"  GRPO mean reward, first {window} steps {first:.3f} +- {first_std:.3f} -> last {window} "
                 f"{last:.3f} +- {last_std:.3f} (+- : std between steps; change {last - first:+.3f} = {rise})")
  end = rl[-window:]
  if end and all("reward/format" in r for r in end):
    rollouts = [r.get("rollout/num_trajectories", 1.0) for r in end]
    fmt = float(np.average([r["reward/format"] for r in end], weights=rollouts))
    tools = [r["rollout/tool_calls_per_trajectory"] for r in end if "rollout/tool_calls_per_trajectory" in r]
    lines.append(
        f"  at the end (last {len(end)} GRPO steps, {sum(rollouts):.0f} rollouts): reward/format {fmt:.3f} "
        f"(last step {end[-1]['reward/format']:.3f})" +
        (f", tool calls per trajectory {np.average(tools, weights=rollouts):.2f}" if len(tools) == len(end) else ""))
  return lines


def end_summary(workdir: str, history: Sequence[Mapping[str, float]], exported: str | None, sft_steps: int = 0) -> str:
  """Steps run, the reward curve in a line (and, after a warm-up, the phases' numbers), where the outputs are and
  how to look at them."""
  lines = ["varft: done"]
  rewarded = [row for row in history if "reward/mean" in row]
  if rewarded:
    rewards = [row["reward/mean"] for row in rewarded]
    curve = " ".join(f"{r:.2f}" for r in rewards[-20:])
    lines.append(f"  steps {rewarded[0]['step']}..{rewarded[-1]['step']}: reward {rewards[0]:.3f} -> "
                 f"{rewards[-1]:.3f} (last {min(len(rewards), 20)}: {curve})")
  elif history:
    lines.append(f"  steps {history[0]['step']}..{history[-1]['step']}")
  lines += phase_lines(history, sft_steps)
  lines.append(f"  metrics: {os.path.join(workdir, 'metrics.jsonl')}; samples: {os.path.join(workdir, 'samples')}")
  if exported:
    lines.append(f"  HF export: {exported} (transformers-loadable, tokenizer and processor included)")
  lines.append(f"  TensorBoard: pip install tensorboard && tensorboard --logdir {os.path.join(workdir, 'tb')}")
  return "\n".join(lines)
