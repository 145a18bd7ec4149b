"""Reference trajectories -> supervised rows in the training-batch schema of `varft.batch` (tokens, loss mask,
M-RoPE positions, per-device image tables).

The records are the ones the step-wise RL mode reads (`varft.data`: MAT-Training's reference steps, or the embedded
demo's), prompted exactly as the rollout prompts them (`varft.prompts`, the chat template of
`varft.processing.chat`). Two kinds of rows:

  stepwise   one reference step: the step's prompt (agent prompt, query, earlier steps) -> the reference turn
  multiturn  one whole trajectory as the multi-turn rollout sees it: the bare query, then each reference turn, each
             answered by its observation as a user turn (the search results the next step's context holds, the
             paper's `<tips>` after a `<problem>`, the repaired image after a `<code>` step)

Only the reference turns (and their closing `<|im_end|>`) get `loss_mask` 1; prompt, observation and image tokens
get 0. Observations are cut to `max_tool_output_tokens` with the rollout's note, so a row is what a rollout that
took the reference actions would hold.
"""
from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
from typing import Any

import numpy as np

from varft import actions as actions_lib
from varft import batch as batch_lib
from varft import prompts, sampling, tags
from varft.models.qwen25vl import rope
from varft.processing import chat
from varft.processing import image as image_lib

FORMATS = ("stepwise", "multiturn")
TRUNCATION_NOTE = " ... [tool output truncated: {} more tokens]"  # as varft.rollout writes it
# The reasoning sentence of a reference turn whose record keeps only the bare step (the published search data).
# Each step's sentence shares no words with the others (a tiny model blends look-alike sentences) nor with the demo's
# reference thinks in the context, and names its action last, a few tokens before the action's tag: a 2-layer model
# copies that word; from further back it copies the tag that follows `</think>` in the context instead.
_THINK = {
    "search": "I need to search for this.",
    "answer": "Now I can answer.",
    "problem": "What is the problem?",
    "code": "Time to write code."
}


class UnusableReference(ValueError):
  """A reference that cannot become a supervised row (skipped and counted)."""


THINK_MODES = ("gt", "step")


def reference_turn(example: Mapping[str, Any], think: str = "gt") -> str:
  """The assistant turn a reference step teaches: its `gt` (think + step) when the data keeps it and `think='gt'`,
  else a short per-step think sentence before the step's `solution` (`think='step'`: a tiny model cannot predict a
  think that describes the image, and one it cannot predict breaks the format it is learning)."""
  gt = (example.get("gt") or "").strip()
  if gt and think == "gt":
    return gt
  solution = (example.get("solution") or "").strip()
  step = example.get("step_type") or actions_lib.parse_action(solution).kind
  if not solution or step not in _THINK:
    raise UnusableReference(f"example {example.get('id')!r} has no reference step (solution={solution!r:.60})")
  return f"<think> {_THINK[step]} </think>\n{solution}"


@dataclasses.dataclass
class Image:
  patches: np.ndarray
  grid: np.ndarray
  num_tokens: int
  pil: Any


@dataclasses.dataclass
class Row:
  """One supervised sequence being built: per token its id, loss flag, image slot; M-RoPE positions by chunk."""
  tokens: list[int] = dataclasses.field(default_factory=list)
  loss_mask: list[int] = dataclasses.field(default_factory=list)
  image_key: list[str | None] = dataclasses.field(default_factory=list)
  image_local: list[int] = dataclasses.field(default_factory=list)
  positions: list[np.ndarray] = dataclasses.field(default_factory=list)
  next_position: int = 0
  text: list[str] = dataclasses.field(default_factory=list)  # readable transcript

  def add_text(self, ids: Sequence[int], loss: bool) -> None:
    pos, self.next_position = rope.text_positions(self.next_position, len(ids))
    self.tokens += [int(t) for t in ids]
    self.loss_mask += [int(loss)] * len(ids)
    self.image_key += [None] * len(ids)
    self.image_local += [-1] * len(ids)
    self.positions.append(pos)

  def add_image(self, key: str, image: Image, pad_id: int, merge: int) -> None:
    pos, self.next_position = rope.image_positions(self.next_position, image.grid, merge)
    self.tokens += [pad_id] * image.num_tokens
    self.loss_mask += [0] * image.num_tokens
    self.image_key += [key] * image.num_tokens
    self.image_local += list(range(image.num_tokens))
    self.positions.append(pos)

  @property
  def images(self) -> list[str]:
    return list(dict.fromkeys(k for k in self.image_key if k is not None))


class RowBuilder:
  """Builds rows for one batch; images are processed once per distinct image (the rollout's settings)."""

  def __init__(self, tokenizer: chat.Tokenizer, merge: int, min_pixels: int, max_pixels: int,
               max_tool_output_tokens: int, system_prompt: str = "auto", think: str = "gt"):
    if think not in THINK_MODES:
      raise ValueError(f"sft.think {think!r} is not one of {THINK_MODES}")
    self.think = think
    self.tok, self.merge = tokenizer, merge
    self.min_pixels, self.max_pixels = min_pixels, max_pixels
    self.max_tool_output_tokens = max_tool_output_tokens
    self.system_prompt = system_prompt
    self.table: dict[str, Image] = {}
    self._open = tokenizer.encode(f"{chat.IM_END}\n{chat.IM_START}user\n")[1:]  # after the turn's <|im_end|>
    self._close = tokenizer.encode(f"{chat.IM_END}\n{chat.IM_START}assistant\n")

  def image(self, source) -> str:
    pil = image_lib.load_image(source)
    key = hashlib.sha1(pil.tobytes() + repr(pil.size).encode()).hexdigest()
    if key not in self.table:
      patches, grid = image_lib.process_image(pil, self.min_pixels, self.max_pixels)
      self.table[key] = Image(patches, np.asarray(grid, np.int64), int(np.prod(grid)) // self.merge ** 2, pil)
    return key

  def _system(self, example) -> str:
    name = self.system_prompt
    return prompts.system_prompt(example.get("task", "search") if name == "auto" else name)

  def prompt(self, example: Mapping[str, Any], with_context: bool) -> Row:
    """The user turn (images, agent prompt, query, and the earlier steps when `with_context`), then the
    generation prompt: the same text the rollout renders."""
    keys = [self.image(img) for img in example.get("images") or ()]
    text = prompts.user_text(self._system(example), example["question"],
                             example.get("context", "") if with_context else "")
    content = [{"type": "image"} for _ in keys] + [{"type": "text", "text": text}]
    rendered = chat.render_messages([{"role": "user", "content": content}])
    row, run, images = Row(text=[rendered]), [], iter(keys)
    for token in self.tok.encode(rendered):
      if token != self.tok.image_pad_id:
        run.append(token)
        continue
      row.add_text(run, loss=False)
      run = []
      key = next(images, None)
      if key is None:
        raise UnusableReference(f"example {example.get('id')!r}: more image placeholders than images")
      row.add_image(key, self.table[key], self.tok.image_pad_id, self.merge)
    row.add_text(run, loss=False)
    return row

  def assistant(self, row: Row, text: str) -> None:
    row.add_text(self.tok.encode(text) + [self.tok.im_end_id], loss=True)
    row.text.append(f"--- assistant ---\n{text}")

  def observation(self, row: Row, text: str, image_key: str | None = None) -> None:
    """A tool's answer as the rollout appends it: a user turn with the image (if any) and the cut text."""
    body = self.tok.encode(text) if text else []
    if len(body) > self.max_tool_output_tokens:
      cut = len(body) - self.max_tool_output_tokens
      body = body[:self.max_tool_output_tokens] + self.tok.encode(TRUNCATION_NOTE.format(cut))
    row.add_text(self._open, loss=False)
    if image_key is not None:
      row.add_text([self.tok.vision_start_id], loss=False)
      row.add_image(image_key, self.table[image_key], self.tok.image_pad_id, self.merge)
      row.add_text([self.tok.vision_end_id], loss=False)
    row.add_text(body + self._close, loss=False)
    row.text.append(f"--- user ---\n{'[image] ' if image_key else ''}{self.tok.decode(body)}")

  def stepwise(self, example: Mapping[str, Any]) -> Row:
    row = self.prompt(example, with_context=True)
    self.assistant(row, reference_turn(example, self.think))
    return row

  def multiturn(self, steps: Sequence[Mapping[str, Any]]) -> Row:
    """One trajectory (its steps in order) as a multi-turn conversation with the observations in between."""
    row = self.prompt(steps[0], with_context=False)
    for i, step in enumerate(steps):
      turn = reference_turn(step, self.think)
      self.assistant(row, turn)
      if i + 1 < len(steps):
        text, image = self._observation_of(step, turn, steps[i + 1])
        self.observation(row, text, image)
    return row

  def _observation_of(self, step, turn: str, following) -> tuple[str, str | None]:
    action = actions_lib.parse_action(turn)
    if action.kind == "problem":
      return prompts.problem_tip(action.problems), None
    if action.kind == "search":
      found = tags.INFORMATION_RE.findall(following.get("context", ""))
      if not found:
        raise UnusableReference(f"example {following.get('id')!r}: no <information> after the search step")
      return found[-1], None
    if action.kind == "code":
      images = list(following.get("images") or ())
      if not images:
        raise UnusableReference(f"example {following.get('id')!r}: no repaired image after the code step")
      return "", self.image(images[0])
    raise UnusableReference(f"example {step.get('id')!r}: a {action.kind!r} step cannot be followed by another")


def collate(rows: Sequence[Row], table: Mapping[str, Image], *, num_rows: int, num_devices: int,
            length_buckets: Sequence[int], patch_buckets: Sequence[int], vision_cfg,
            max_image_patches: int = 0) -> dict[str, Any]:
  """The `varft.batch` batch of `rows` (the rollout's schema: each row its own group, no sampler log-probs),
  padded with empty rows to `num_rows`, rows split over `num_devices` devices in order, each device's images in
  its own table."""
  length = sampling.bucket(max(len(r.tokens) for r in rows), length_buckets)
  images = {k: batch_lib.Image(im.patches, im.grid) for k, im in table.items()}
  batch_rows = [
      batch_lib.Row(b, r.tokens, np.concatenate(r.positions, axis=1), r.loss_mask, [0.0] * len(r.tokens), r.image_key,
                    r.image_local) for b, r in enumerate(rows)
  ]
  return batch_lib.assemble(batch_rows, images, num_rows=num_rows, num_samples=1, num_devices=num_devices,
                            length=length, vision_cfg=vision_cfg, patch_buckets=patch_buckets,
                            max_image_patches=max_image_patches)


def trajectory_key(example: Mapping[str, Any]) -> tuple[str, str]:
  """Steps of one trajectory: the stem of their `id` (`row:stem:step`, see `varft.data.records`) and question."""
  parts = str(example.get("id", "")).split(":")
  return (parts[1] if len(parts) == 3 else ""), example["question"]


class ReferenceSource:
  """Random access to supervised units: one step each (stepwise), or one trajectory's steps in order (multiturn).

  Multi-turn units group the step records by `trajectory_key`, in the order of their growing context; a
  trajectory is kept only if it ends with an answer step.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], fmt: str):
    if fmt not in FORMATS:
      raise ValueError(f"sft.format {fmt!r} is not one of {FORMATS}")
    self.source, self.format = source, fmt
    if fmt == "stepwise":
      self.units = [[i] for i in range(len(source))]
      return
    groups = collections.defaultdict(list)
    for i in range(len(source)):
      ex = source[i]
      groups[trajectory_key(ex)].append((len(ex.get("context") or ""), i, ex.get("step_type")))
    self.units = [[i for _, i, _ in sorted(steps)] for steps in groups.values() if sorted(steps)[-1][2] == "answer"]
    if not self.units:
      raise ValueError("sft.format=multiturn: no trajectory of the training data ends with an answer step")

  def __len__(self) -> int:
    return len(self.units)

  def __getitem__(self, index: int) -> list[dict]:
    return [self.source[i] for i in self.units[index]]
