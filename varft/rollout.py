"""Batched multi-turn agentic rollouts: the jitted sampler in a host loop with the tool executor.

One `RolloutEngine.run` takes B examples x G samples through up to `max_turns` turns, each trajectory on its own
schedule (`varft.scheduler`: continuous batching over fixed device slots):

    prompt (chat template; prefilled once per prompt and copied into its G slots; each device encodes its own
    rows' images, once per distinct image) -> generate until a stop tag / EOS / budget -> parse the turn
    (`varft.turns`) -> submit its tool calls -> (other rows keep decoding) -> tokenize each observation once ->
    extend that row's cache with it -> generate ...

Token-in/token-out: every row keeps a ledger of exactly the tokens the sampler saw (sampled tokens with their
log-probs and loss_mask 1; prompt and observation tokens with loss_mask 0), their M-RoPE positions and image tokens.
A search result comes back as a user turn `<information> 1. Content:... </information>` (the paper's format), a code
result as a user turn carrying the output image (vision tokens at their 3-D positions) and any printed text/error,
and a `<problem>` step as the paper's `<tips>` hint. Step-wise mode (the paper's training) makes one turn per sample
from a prompt that already carries the earlier steps (`example['context']`).

Options the released Visual-ARFT code needs (its `paper` setting): `layout='single_turn'` rebuilds, every turn, one
user message (agent prompt + query + the chain so far with its observations; for coding the latest output image
*replaces* the image) and prefills it afresh, as the released eval scripts and the step-wise training samples do
(the ledger then holds the last turn's prompt and sample); `agent_rules='paper'` reads turns and answers them as
those scripts do (`varft.paper_rules`: their regexes, a search error ends the item without a prediction, a code
call shows only its output image, the coding eval's first prompt as released); `stop_at='eos'` generates to EOS
or the budget instead of stopping at the first closing tag; `repetition_penalty` (transformers' semantics, over
the row's whole context); `crop_override` puts the question's box into a crop step's `[a:b, c:d]` slices.

Rows are spread over every device of the sampler's mesh (a prompt's G rows side by side, so usually on one device);
an extend encodes the images its chunk shows on the devices whose rows show them (`varft.batch` image tables), so
no device encodes another's images and no image is encoded twice for one device.

The result is the padded training batch of `varft.batch` (numpy, this host's rows) plus readable transcripts.
`run(..., slots=n)` streams the examples through n slots (evaluation): a finished trajectory's slot takes the next.
"""
from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import concurrent.futures
import logging
import time
from typing import Any, Protocol

import jax
import numpy as np

from varft import actions as actions_lib
from varft import batch as batch_lib
from varft import environment, prompts, rollout_config, sampling, scheduler, turns
from varft.image_table import ImageTable
from varft.models.qwen25vl import rope
from varft.models.qwen25vl.config import Qwen25VLConfig
from varft.processing import chat
from varft.processing import image as image_lib
from varft.rollout_config import RolloutConfig
from varft.tools import code as code_lib
from varft.tools.executor import ToolCall
from varft.trajectory import Ledger, RolloutResult, Transcript

log = logging.getLogger(__name__)
MODES, LAYOUTS, AGENT_RULES, STOP_AT = (rollout_config.MODES, rollout_config.LAYOUTS, rollout_config.AGENT_RULES,
                                        rollout_config.STOP_AT)
STOP_REASONS = turns.STOP_REASONS


class Executor(Protocol):
  """Runs tool calls: `execute(calls)` (a batch, in order); `submit(call) -> Future`, when it has it, is used
  instead so that each call starts as soon as its turn stops."""

  def execute(self, calls: Sequence[Any]) -> Sequence[Any]:
    ...


class RolloutEngine:
  """Runs batched multi-turn (or step-wise) rollouts of a Qwen2.5-VL policy with tools."""

  def __init__(self, model_config: Qwen25VLConfig, tokenizer: chat.Tokenizer, executor: Executor, config: RolloutConfig,
               *, mesh: jax.sharding.Mesh | None = None, stop_table: sampling.StopTable | None = None,
               batch_devices: int = 1):
    """`mesh`: where to sample (rows over all its batch axes); `batch_devices`: this host's devices along the
    training mesh's batch axes, the number of image tables of the training batch (`varft.batch`)."""
    self.model_config = model_config
    self.tokenizer = tokenizer
    self.executor = executor
    self.config = config
    self.merge = model_config.vision.spatial_merge_size
    stop_table = stop_table or sampling.make_stop_table(tokenizer, model_config.text.vocab_size, config.stop_strings)
    eos = (tokenizer.im_end_id, tokenizer.end_of_text_id)
    self.sampler = sampling.Sampler(model_config, config.sampling_config(eos), stop_table, mesh=mesh)
    self.cache_len = config.max_total_tokens + max(config.chunk_buckets)
    self._turn_open = tokenizer.encode(f"{chat.IM_END}\n{chat.IM_START}user\n")
    self._turn_close = tokenizer.encode(f"{chat.IM_END}\n{chat.IM_START}assistant\n")
    self.batch_devices = batch_devices
    self.max_image_patches = config.image_max_pixels // model_config.vision.patch_size ** 2
    self.images_encoded = 0  # (device, image) pairs run through the vision tower, over all runs
    self.images: ImageTable | None = None  # the running rollout's images
    self._outbox: list[tuple[ToolCall, concurrent.futures.Future]] = []

  # ---- prompts ----------------------------------------------------------------------------------------------------

  def _first_text(self, example) -> str:
    """The text of the first user message (after its images)."""
    name = self.config.system_prompt
    system = prompts.system_prompt(example.get("task", "search") if name == "auto" else name)
    if self.config.mode == "stepwise":
      return prompts.user_text(system, example["question"], example.get("context", ""))
    if self.config.agent_rules == "paper" and example.get("task") == "coding":
      return prompts.released_coding_text(system, example["question"])
    return prompts.user_text(system, example["question"])

  def _encode_prompt(self, text: str, keys: Sequence[str]) -> tuple[list[int], str]:
    content = [{"type": "image"} for _ in keys] + [{"type": "text", "text": text}]
    rendered = chat.render_messages([{"role": "user", "content": content}])
    ids = chat.expand_image_pads(self.tokenizer.encode(rendered), [self.images[k].grid for k in keys] or None,
                                 self.merge, self.tokenizer.image_pad_id)
    return ids, rendered

  def _start(self, row: Ledger, ids: Sequence[int], keys: Sequence[str]) -> None:
    """Puts a prompt into the row's (empty or reset) ledger: M-RoPE positions and per-token image references."""
    pos, _ = rope.sequence_positions(np.asarray([ids]), [self.images[k].grid for k in keys] or None, self.model_config)
    key_per_token, local_per_token = [None] * len(ids), [-1] * len(ids)
    image_slots = iter(np.flatnonzero(np.asarray(ids) == self.tokenizer.image_pad_id))
    for k in keys:
      for i in range(self.images[k].num_tokens):
        t = next(image_slots)
        key_per_token[t], local_per_token[t] = k, i
    row.start(ids, pos[:, 0], key_per_token, local_per_token, keys)

  def _start_rows(self, examples, num_samples: int) -> tuple[list[list[Ledger]], list[str]]:
    """The prompted trajectories, one group of `num_samples` per example that can be prompted; the skipped ids."""
    groups, skipped = [], []
    for example in examples:
      try:
        keys = [self.images.add(img) for img in example.get("images", ())]
        head = self._first_text(example)
        ids, rendered = self._encode_prompt(head, keys)
        if len(ids) >= self.config.max_total_tokens:
          raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_total_tokens "
                           f"{self.config.max_total_tokens}")
      except (image_lib.ImageError, OSError, ValueError, KeyError) as e:
        log.warning("Skipping example %r: %s", example.get("id"), e)
        skipped.append(str(example.get("id")))
        continue
      image_refs = [f"prompt:{i}" for i in range(len(keys))]
      group, first = [], len(groups) * num_samples
      for s in range(num_samples):
        message = {"role": "user", "text": rendered, "images": image_refs}
        transcript = Transcript(str(example.get("id", len(groups))), len(groups), s, messages=[message])
        row = Ledger(len(groups), [], [], [], [], 0, [], transcript, task=example.get("task", "search"),
                     question=example["question"], head=head, shown=list(zip(keys, image_refs)), index=first + s)
        self._start(row, ids, keys)
        group.append(row)
      groups.append(group)
    return groups, skipped

  def ledger_chunk(self, row: Ledger):
    """The row's whole ledger as a prefill chunk: (tokens, positions, image keys, image-local indices)."""
    return row.tokens, np.concatenate(row.positions, axis=1), row.image_key, row.image_local

  def scripted_tokens(self, row: Ledger) -> Sequence[int] | None:
    """Tokens to force for the rest of the row's current turn (entries < 0 sampled); None: all sampled. The
    engine samples freely; a scripted policy (tests, benchmarks) overrides this."""
    del row
    return None

  # ---- turns ------------------------------------------------------------------------------------------------------

  def end_turn(self, row: Ledger, stop_reason: int, stop_index: int) -> None:
    """A row's turn stopped: record it, end the trajectory or queue its tool calls (`flush_calls` sends them)."""
    cfg = self.config
    new = row.turn_tokens
    text = self.tokenizer.decode(new)
    plain = self.tokenizer.decode(new, skip_special_tokens=True)
    stop = self.sampler.stop_table.strings[stop_index] if stop_index >= 0 else None
    row.transcript.messages.append({"role": "assistant", "text": text, "images": [], "plain": plain, "stop": stop})
    actions, row.last_query = turns.read_actions(text, plain, row.task, row.last_query, cfg.agent_rules)
    row.transcript.actions.extend(actions)
    max_turns = 1 if cfg.mode == "stepwise" else cfg.max_turns
    end = turns.turn_end(actions[0], stop_reason == sampling.LENGTH,
                         len(row.tokens) >= cfg.max_total_tokens, cfg.mode == "stepwise", row.turns >= max_turns)
    if end is not None:
      row.finish(end)
      return
    for action in actions:
      if action.kind == "problem":  # a code call of the same turn already follows it (crop override)
        row.problems = action.problems
      call, overridden = self._tool_call(row, action, f"{row.index}:{row.turns}")
      future = concurrent.futures.Future()
      if call is None:
        future.set_result(None)
      else:
        self._outbox.append((call, future))
      row.waiting.append((action, future, overridden))

  def flush_calls(self) -> None:
    """Sends the queued calls: each on its own (`executor.submit`), or as one `execute` batch."""
    calls, self._outbox = self._outbox, []
    if not calls:
      return
    if hasattr(self.executor, "submit"):
      for call, future in calls:
        self.executor.submit(call).add_done_callback(lambda done, future=future: future.set_result(done.result()))
      return
    observations = list(self.executor.execute([c for c, _ in calls]))
    if len(observations) != len(calls):
      raise RuntimeError(f"The tool executor returned {len(observations)} observations for {len(calls)} calls.")
    for (_, future), obs in zip(calls, observations):
      future.set_result(obs)

  def _tool_call(self, row: Ledger, action: actions_lib.Action, call_id: str):
    """(the call an action makes or None, whether the crop override changed its program)."""
    if action.kind == "search":
      return ToolCall("search", action.content, None, call_id), False
    if action.kind != "code" or not action.content:
      return None, False
    image = self.images[row.images[-1]].pil if row.images else None
    program, overridden = action.content, False
    box = code_lib.question_box(row.question) if self.config.crop_override else None
    if box is not None and image is not None and row.problems[:1] == ("crop",):
      program, count = code_lib.override_crop(program, box, *image.size)
      overridden = count > 0
    images = {"path_to_input_image.jpg": image} if image is not None else None
    return ToolCall("code", program, images, call_id), overridden

  def _observation(self, action: actions_lib.Action, obs, turn: int):
    """One action's observation: its text tokens (cut to the limit), image key, transcript entry and text."""
    image_key, image_error = None, None
    if action.kind == "code" and obs is not None and obs.ok and obs.image is not None:
      try:
        image_key = self.images.add(obs.image)
      except (image_lib.ImageError, OSError, ValueError) as e:
        image_error = str(e)
    text, ok, error = turns.observation_text(action, obs, image_error, self.config.agent_rules == "paper")
    body, truncated = turns.cut(
        self.tokenizer.encode(text) if text else [], self.config.max_tool_output_tokens, self.tokenizer.encode)
    ref = f"turn{turn}:output" if image_key is not None else None
    entry = {"kind": action.kind, "ok": ok, "error": error, "truncated": truncated, "image": ref}
    return body, image_key, entry, self.tokenizer.decode(body)

  def observe(self, row: Ledger):
    """Records a row's observations (its futures are done): ('extend', chunk) of the chat layout's user turn,
    ('prefill', chunk) of the single-turn layout's next prompt, or (None, None) when the trajectory ends."""
    cfg = self.config
    turn_text = row.transcript.messages[-1]["plain"]
    observed = []
    for action, future, overridden in row.waiting:
      body, image_key, entry, body_text = self._observation(action, future.result(), row.turns)
      entry["crop_override"] = overridden
      row.transcript.observations.append(entry)
      if action.kind == "search" and not entry["ok"] and cfg.agent_rules == "paper":
        row.finish("tool_error")  # the released scripts drop the item on any search failure
        break
      observed.append((action, body, image_key, entry, body_text))
    acted, row.waiting = len(observed) == len(row.waiting), []
    if not acted:
      return None, None
    if cfg.layout == "single_turn":
      return self._restart(row, turn_text, observed)
    opening = self._turn_open[1:] if row.tokens[-1] == self.tokenizer.im_end_id else self._turn_open
    pieces = turns.chat_turn(opening, self._turn_close, [(o[1], o[2]) for o in observed], {
        k: e.num_tokens for k, e in self.images.entries.items()
    }, self.tokenizer)
    chunk_len = sum(len(ids) for ids, _ in pieces)
    if len(row.tokens) + chunk_len >= cfg.max_total_tokens or chunk_len > max(cfg.chunk_buckets):
      row.finish("max_tokens")
      return None, None
    grids = {k: e.grid for k, e in self.images.entries.items()}
    ids, pos, keys, local, nxt = turns.place(pieces, row.next_position, grids, self.merge)
    row.append(ids, pos, nxt, image_key=keys, image_local=local)
    refs = []
    for _, _, image_key, entry, _ in observed:
      if image_key is not None:
        row.images.append(image_key)
        row.transcript.images[entry["image"]] = self.images[image_key].pil
        refs.append(entry["image"])
    row.transcript.messages.append({"role": "user", "text": "".join(o[4] for o in observed), "images": refs})
    return "extend", (ids, pos, keys, local)

  def _restart(self, row: Ledger, turn_text: str, observed):
    """Single-turn layout: the chain grows by the turn and its observations, the output image replaces the
    prompt's; the row's next prompt becomes its new ledger."""
    paper = self.config.agent_rules == "paper"
    for action, _, image_key, entry, body_text in observed:
      row.chain += turns.chain_step(turn_text, action, body_text, paper)
      if image_key is not None:
        row.shown = [(image_key, entry["image"])]
        row.transcript.images[entry["image"]] = self.images[image_key].pil
    keys, refs = [k for k, _ in row.shown], [r for _, r in row.shown]
    ids, rendered = self._encode_prompt(row.head + row.chain, keys)
    if len(ids) >= self.config.max_total_tokens:
      row.finish("max_tokens")
      return None, None
    self._start(row, ids, keys)
    row.transcript.messages.append({"role": "user", "text": rendered, "images": refs})
    return "prefill", self.ledger_chunk(row)

  # ---- the run ----------------------------------------------------------------------------------------------------

  def run(self, params, examples: Sequence[Mapping[str, Any]], rng: jax.Array, num_samples: int = 1,
          slots: int | None = None) -> RolloutResult:
    """Rolls out `num_samples` trajectories per example; returns the training batch, transcripts and stats.

    `slots`: device rows to decode on (default: one per trajectory); fewer stream the examples through them, a
    finished trajectory's slot taking the next prompt. Examples that cannot be prompted (unreadable image, prompt
    over the length limit) are skipped, counted in `stats['skipped']` and logged.
    """
    cfg = self.config
    self.images = ImageTable(cfg.image_min_pixels, cfg.image_max_pixels, cfg.image_prefit, self.model_config.vision,
                             cfg.patch_buckets)
    groups, skipped = self._start_rows(examples, num_samples)
    if not groups:
      raise environment.SampleRejected(f"No example could be prompted ({len(skipped)} skipped: {skipped[:5]}).")
    rows = [r for g in groups for r in g]
    slots = len(rows) if slots is None else slots
    if slots < num_samples:
      raise ValueError(f"{slots} slots cannot hold a prompt's {num_samples} samples")
    # On a mesh the device slots are padded with empty ones (never live) to a multiple of its row shards.
    shards = self.sampler.num_shards
    loop = scheduler.Scheduler(self, params, rng, -(-slots // shards) * shards)
    start = time.perf_counter()
    loop.run(groups)
    for r in rows:
      if not r.done:
        r.finish("max_turns")
      r.transcript.num_tokens = len(r.tokens)
    self.images_encoded += self.images.encoded
    stats = self._stats(rows, skipped, loop, time.perf_counter() - start)
    batch = self._batch(rows, len(examples) * num_samples, num_samples)
    return RolloutResult(batch, [r.transcript for r in rows], stats)

  def _stats(self, rows: Sequence[Ledger], skipped, loop: scheduler.Scheduler, run_s: float) -> dict[str, Any]:
    transcripts = [r.transcript for r in rows]
    reasons = collections.Counter(t.stop_reason for t in transcripts)
    counts = loop.counts
    return {
        "num_trajectories": len(rows),
        "skipped": len(skipped),
        "mean_turns": float(np.mean([r.turns for r in rows])),
        "tool_calls": sum(t.tool_stats()["num_calls"] for t in transcripts),
        "tool_failures": sum(t.tool_stats()["num_failed"] for t in transcripts),
        "crop_overrides": sum(o.get("crop_override", False) for t in transcripts for o in t.observations),
        "sampled_tokens": int(sum(sum(r.loss_mask) for r in rows)),
        "mean_length": float(np.mean([len(r.tokens) for r in rows])),
        "stop_reasons": {
            r: reasons[r] for r in STOP_REASONS
        },
        "images_encoded": self.images.encoded,
        "temperature": self.config.temperature,
        "prefill_tokens": counts["prefill_tokens"],
        "generate_calls": counts["generate_calls"],
        "extends": counts["extends"],
        "decode_steps": counts["decode_steps"],
        # Rows computed: by the decode steps (rows of each call x its steps) and by the extends (rows of each).
        "decode_rows": counts["slot_steps"],
        "extend_rows": counts["extend_rows"],
        # Of the rows the generate calls computed (gathered decoding rows, or every slot in place), the fraction
        # that decoded a live row; and of those holding an unfinished trajectory (the rest: finished or empty).
        "live_slot_fraction": counts["live_slot_steps"] / max(counts["slot_steps"], 1),
        "live_occupied_fraction": counts["live_slot_steps"] / max(counts["occupied_slot_steps"], 1),
        "run_s": round(run_s, 4),
        **{
            k: round(v, 4) for k, v in loop.timings.items()
        },
    }

  def _batch(self, rows: Sequence[Ledger], num_rows: int, num_samples: int) -> dict[str, Any]:
    """The `varft.batch` rollout batch: `num_rows` rows (the skipped prompts' rows empty; rounded up to a multiple
    of the training batch's devices), each device's images in its own table."""
    num_rows = -(-num_rows // self.batch_devices) * self.batch_devices
    length = sampling.bucket(max(len(r.tokens) for r in rows), self.config.length_buckets)
    return batch_lib.assemble([r.batch_row() for r in rows], self.images.batch_images(), num_rows=num_rows,
                              num_samples=num_samples, num_devices=self.batch_devices, length=length,
                              vision_cfg=self.model_config.vision, patch_buckets=self.config.patch_buckets,
                              max_image_patches=self.max_image_patches)
