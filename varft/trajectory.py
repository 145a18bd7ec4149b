"""One trajectory of a rollout: one record (`Ledger`) holding its tokens (what training sees), the state its next
turn needs, and its readable transcript (a part of the record, filled as the trajectory goes)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from varft import actions as actions_lib
from varft import batch as batch_lib


@dataclasses.dataclass
class Transcript:
  """A readable trajectory for logging and rewards. Images are referenced by name (`prompt:0`, `turn2:output`);
  `images` holds the tool-output images (prompt images are the example's)."""
  example_id: str
  group_id: int
  sample_index: int
  # role, text (as sampled, special tokens included), images (refs); assistant turns also `plain` (without them)
  messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  actions: list[actions_lib.Action] = dataclasses.field(default_factory=list)
  observations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # kind, ok, error, truncated, image
  images: dict[str, Image.Image] = dataclasses.field(default_factory=dict)
  stop_reason: str = ""
  num_tokens: int = 0

  @property
  def completion(self) -> str:
    """The text of the last assistant turn without special tokens (what the rewards score, as the released trainer
    decodes it: a turn generated to EOS does not end in `<|im_end|>`)."""
    turns = [m.get("plain", m["text"]) for m in self.messages if m["role"] == "assistant"]
    return turns[-1] if turns else ""

  @property
  def answer(self) -> str | None:
    answers = [a.content for a in self.actions if a.kind == "answer"]
    return answers[-1] if answers else None

  def tool_stats(self) -> dict[str, Any]:
    """Counts the rewards use: calls, failed calls, whether every turn parsed, successful code runs."""
    tools = [o for o in self.observations if o["kind"] in ("search", "code")]
    return {
        "num_calls": len(tools),
        "num_failed": sum(not o["ok"] for o in tools),
        "all_valid": all(a.kind != "malformed" for a in self.actions),
        "num_code_success": sum(o["ok"] for o in tools if o["kind"] == "code")
    }

  def render(self) -> str:
    lines = []
    for m in self.messages:
      refs = "".join(f"[image {r}]" for r in m.get("images", ()))
      lines.append(f"--- {m['role']} ---\n{refs}{m['text']}")
    lines.append(f"--- stop: {self.stop_reason} ({self.num_tokens} tokens) ---")
    return "\n".join(lines)


@dataclasses.dataclass
class RolloutResult:
  batch: dict[str, Any]
  transcripts: list[Transcript]
  stats: dict[str, Any]


@dataclasses.dataclass
class Ledger:
  """The record of one trajectory: every token the sampler saw, the state its next turn needs, its transcript."""
  group: int
  tokens: list[int]
  image_key: list[str | None]  # per token: which image it belongs to (None for text)
  image_local: list[int]  # per token: index within that image's merged tokens
  positions: list[np.ndarray]  # (3, n) chunks
  next_position: int
  images: list[str]  # image keys in order of appearance
  transcript: Transcript
  loss_mask: list[int] = dataclasses.field(default_factory=list)
  logps: list[float] = dataclasses.field(default_factory=list)
  turns: int = 0
  done: bool = False
  # The example's text and, for the single-turn layout, the prompt text so far and the image it shows.
  task: str = "search"
  question: str = ""
  head: str = ""
  chain: str = ""
  shown: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (image key, transcript ref) pairs
  problems: tuple[str, ...] = ()  # the latest <problem> set
  last_query: str | None = None
  # Where the scheduler has it: its trajectory index, the ledger index where its current turn began, and the
  # turn's actions waiting for their tools: (action, future of its Observation or None, crop override applied).
  index: int = 0
  slot: int = -1
  turn_start: int = 0
  waiting: list[tuple[actions_lib.Action, Any, bool]] = dataclasses.field(default_factory=list)

  @property
  def turn_tokens(self) -> list[int]:
    """The tokens sampled so far in the current turn."""
    return self.tokens[self.turn_start:]

  def start(self, tokens, positions, image_key, image_local, images):
    """Resets the ledger to a prompt (a new single-turn prompt replaces the whole ledger)."""
    self.tokens, self.loss_mask, self.logps, self.image_key, self.image_local = [], [], [], [], []
    self.positions, self.images = [], list(images)
    self.append(tokens, positions, int(positions.max()) + 1, image_key=image_key, image_local=image_local)

  def append(self, tokens, positions, next_position, sampled_logps=None, image_key=None, image_local=None):
    n = len(tokens)
    self.tokens.extend(int(t) for t in tokens)
    self.loss_mask.extend([1 if sampled_logps is not None else 0] * n)
    self.logps.extend([float(x) for x in sampled_logps] if sampled_logps is not None else [0.0] * n)
    self.image_key.extend(image_key if image_key is not None else [None] * n)
    self.image_local.extend(image_local if image_local is not None else [-1] * n)
    self.positions.append(positions)
    self.next_position = next_position

  def finish(self, reason: str):
    self.done = True
    self.transcript.stop_reason = reason

  def batch_row(self) -> batch_lib.Row:
    return batch_lib.Row(self.group, self.tokens, np.concatenate(self.positions, axis=1), self.loss_mask, self.logps,
                         self.image_key, self.image_local)
