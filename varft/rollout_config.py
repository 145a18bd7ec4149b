"""The rollout engine's settings: limits, sampling, static-shape buckets, the paper-compatibility options, schedule."""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

from varft import sampling, scheduler, turns
from varft.processing import image as image_lib

MODES = ("multiturn", "stepwise")
LAYOUTS = ("chat", "single_turn")
AGENT_RULES = ("varft", "paper")
STOP_AT = ("closing_tag", "eos")
STOP_REASONS = turns.STOP_REASONS


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Rollout limits, sampling settings and static-shape buckets.

  mode: 'stepwise' (the paper's training: one turn per row, from a reference step's context) or 'multiturn' (whole
  trajectories: actions run as real tool calls and their observations extend the row, up to max_turns).
  max_new_tokens: tokens per turn; max_total_tokens: prompt + all turns + observations per trajectory;
  max_tool_output_tokens: text tokens of one observation (longer ones are cut with a note saying so).
  length_buckets: prompt and final batch lengths; chunk_buckets: observation chunks; patch_buckets: vision patches
  per device's image table. system_prompt: 'auto' (by the example's task), a name in `prompts.SYSTEM_PROMPTS`, or text.
  layout, agent_rules, stop_at, repetition_penalty, crop_override: see the module doc; the defaults are varft's.
  image_prefit: first resize each image as qwen-vl-utils' `fetch_image` does (the released scripts' path: its own
  smart_resize, then the processor's), not in one step.
  schedule: 'continuous' (`varft.scheduler`) or 'lockstep' (every turn: all rows decode, all tools, all extend);
  resume_steps: while tools are out, a generate call returns after this many steps so ready rows can rejoin;
  exit_fraction: and once this fraction of its decoding rows stopped (at least one), so their tools start;
  rejoin_fraction: while rows still decode, rows whose observations are in rejoin (one extend of those rows)
  once they are this fraction of the unfinished rows; an extend computes only its rows, so a small fraction lets
  rows rejoin early at the cost of a few more (small) extends.
  """
  mode: str = "stepwise"
  max_turns: int = 5
  max_new_tokens: int = 512
  max_total_tokens: int = 4096
  max_tool_output_tokens: int = 512
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tags: tuple[str, ...] = turns.AGENT_STOP_TAGS
  length_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
  chunk_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
  patch_buckets: tuple[int, ...] = (1024, 4096, 16384)
  image_min_pixels: int = image_lib.DEFAULT_MIN_PIXELS
  image_max_pixels: int = image_lib.PAPER_MAX_PIXELS
  system_prompt: str = "auto"
  layout: str = "chat"
  agent_rules: str = "varft"
  stop_at: str = "closing_tag"
  repetition_penalty: float = 1.0
  crop_override: bool = False
  image_prefit: bool = False
  schedule: str = "continuous"
  resume_steps: int = 16
  exit_fraction: float = 0.0625
  rejoin_fraction: float = 0.0625

  def __post_init__(self):
    problems = []
    for name, valid in (("mode", MODES), ("layout", LAYOUTS), ("agent_rules", AGENT_RULES), ("stop_at", STOP_AT),
                        ("schedule", scheduler.SCHEDULES)):
      if getattr(self, name) not in valid:
        problems.append(f"{name} {getattr(self, name)!r} is not one of {valid}")
    if not self.repetition_penalty > 0:
      problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
    if min(self.max_turns, self.max_new_tokens, self.max_total_tokens, self.max_tool_output_tokens,
           self.resume_steps) < 1:
      problems.append("max_turns, max_new_tokens, max_total_tokens, max_tool_output_tokens and resume_steps must "
                      "be >= 1")
    for name in ("exit_fraction", "rejoin_fraction"):
      if not 0 <= getattr(self, name) <= 1:
        problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if max(self.length_buckets) < self.max_total_tokens:
      problems.append(f"the largest length bucket {max(self.length_buckets)} is below max_total_tokens "
                      f"{self.max_total_tokens}")
    if max(self.patch_buckets) < self.image_max_pixels // (14 * 14):
      problems.append(f"the largest patch bucket {max(self.patch_buckets)} cannot hold one image of "
                      f"image_max_pixels {self.image_max_pixels} ({self.image_max_pixels // 196} patches)")
    if problems:
      raise ValueError("Invalid rollout config: " + "; ".join(problems))

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> RolloutConfig:
    """From a dict / ConfigDict; unknown keys are an error, lists become tuples."""
    config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
      raise ValueError(f"Unknown rollout config keys {unknown}; valid keys: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})

  def sampling_config(self, eos_ids: tuple[int, ...]) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(self.temperature, self.top_k, self.top_p, self.max_new_tokens, eos_ids)

  @property
  def stop_strings(self) -> tuple[str, ...]:
    return self.stop_tags if self.stop_at == "closing_tag" else ()
