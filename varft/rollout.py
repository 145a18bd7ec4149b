"""Batched multi-turn agentic rollouts: the jitted sampler in a host loop with the tool executor.

One `RolloutEngine.run` takes B examples x G samples through up to `max_turns` turns:

    prompt (chat template; each device encodes its own rows' images, once per distinct image) -> extend the cache
    repeat: generate until a stop tag / EOS / budget -> parse each row's action -> one `executor.execute(calls)`
            for the whole batch -> tokenize each observation once -> extend that row's cache with it

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
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import hashlib
import logging
import time
from typing import Any, Protocol

import jax
import numpy as np

from varft import actions as actions_lib
from varft import batch as batch_lib
from varft import paper_rules, prompts, sampling, turns
from varft.models.qwen25vl import rope
from varft.models.qwen25vl.config import Qwen25VLConfig
from varft.processing import chat
from varft.processing import image as image_lib
from varft.tools import code as code_lib
from varft.tools.executor import ToolCall
from varft.trajectory import ImageEntry, Ledger, RolloutResult, Transcript  # pylint: disable=unused-import

log = logging.getLogger(__name__)

MODES = ("multiturn", "stepwise")
LAYOUTS = ("chat", "single_turn")
AGENT_RULES = ("varft", "paper")
STOP_AT = ("closing_tag", "eos")
# Why a trajectory ended.
STOP_REASONS = ("answer", "step", "malformed", "max_turns", "max_new_tokens", "max_tokens", "tool_error")
TRUNCATION_NOTE = " ... [tool output truncated: {} more tokens]"


class Executor(Protocol):

  def execute(self, calls: Sequence[Any]) -> Sequence[Any]:
    ...


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Rollout limits, sampling settings and static-shape buckets.

  max_new_tokens: tokens per turn; max_total_tokens: prompt + all turns + observations per trajectory;
  max_tool_output_tokens: text tokens of one observation (longer ones are cut with a note saying so).
  length_buckets: prompt and final batch lengths; chunk_buckets: observation chunks; patch_buckets: vision patches
  per device's image table. system_prompt: 'auto' (by the example's task), a name in `prompts.SYSTEM_PROMPTS`, or text.
  layout, agent_rules, stop_at, repetition_penalty, crop_override: see the module doc; the defaults are varft's.
  image_prefit: first resize each image as qwen-vl-utils' `fetch_image` does (the released scripts' path: its own
  smart_resize, then the processor's), not in one step.
  """
  mode: str = "multiturn"
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
  image_max_pixels: int = 1024 * 28 * 28
  system_prompt: str = "auto"
  layout: str = "chat"
  agent_rules: str = "varft"
  stop_at: str = "closing_tag"
  repetition_penalty: float = 1.0
  crop_override: bool = False
  image_prefit: bool = False

  def __post_init__(self):
    problems = []
    for name, valid in (("mode", MODES), ("layout", LAYOUTS), ("agent_rules", AGENT_RULES), ("stop_at", STOP_AT)):
      if getattr(self, name) not in valid:
        problems.append(f"{name} {getattr(self, name)!r} is not one of {valid}")
    if not self.repetition_penalty > 0:
      problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
    if min(self.max_turns, self.max_new_tokens, self.max_total_tokens, self.max_tool_output_tokens) < 1:
      problems.append("max_turns, max_new_tokens, max_total_tokens and max_tool_output_tokens must be >= 1")
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

  # ---- images ---------------------------------------------------------------------------------------------------

  def _add_image(self, table: dict[str, ImageEntry], source) -> str:
    pil = image_lib.load_image(source)
    key = hashlib.sha1(pil.tobytes() + repr(pil.size).encode()).hexdigest()
    if key not in table:
      shown = image_lib.vision_info_resize(pil) if self.config.image_prefit else pil
      patches, grid = image_lib.process_image(shown, self.config.image_min_pixels, self.config.image_max_pixels)
      tokens = int(np.prod(grid)) // self.merge ** 2
      table[key] = ImageEntry(key, pil, patches, np.asarray(grid, np.int64), tokens)
    return key

  def _image_tables(self, rows: Sequence[batch_lib.Row], table: dict[str, ImageEntry]):
    """Each sampler device's table of the images `rows` show and the rows' `image_index` into their own table."""
    images = {k: batch_lib.Image(e.patches, e.grid) for k, e in table.items()}
    per_device, index = batch_lib.device_images(rows, images, self.sampler.num_shards, self.model_config.vision)
    self.images_encoded += sum(len(t) for t in per_device)
    patches = sampling.bucket(batch_lib.table_patches(per_device, self.model_config.vision), self.config.patch_buckets,
                              beyond="multiple")
    tables = batch_lib.image_tables(per_device, self.model_config.vision, patches,
                                    batch_lib.key_blocks(patches, self.max_image_patches, self.model_config.vision))
    return (tables["pixel_values"], tables["vision_inputs"]), index

  # ---- prompts and observations -------------------------------------------------------------------------------

  def _system_prompt(self, example) -> str:
    name = self.config.system_prompt
    return prompts.system_prompt(example.get("task", "search") if name == "auto" else name)

  def _first_text(self, example) -> str:
    """The text of the first user message (after its images)."""
    system = self._system_prompt(example)
    if self.config.mode == "stepwise":
      return prompts.user_text(system, example["question"], example.get("context", ""))
    if self.config.agent_rules == "paper" and example.get("task") == "coding":
      return prompts.released_coding_text(system, example["question"])
    return prompts.user_text(system, example["question"])

  def _encode_prompt(self, text: str, keys: Sequence[str], table) -> tuple[list[int], str]:
    content = [{"type": "image"} for _ in keys] + [{"type": "text", "text": text}]
    rendered = chat.render_messages([{"role": "user", "content": content}])
    ids = chat.expand_image_pads(self.tokenizer.encode(rendered), [table[k].grid for k in keys] or None, self.merge,
                                 self.tokenizer.image_pad_id)
    return ids, rendered

  def _start(self, row: Ledger, ids: Sequence[int], keys: Sequence[str], table) -> None:
    """Puts a prompt into the row's (empty or reset) ledger: M-RoPE positions and per-token image references."""
    pos, _ = rope.sequence_positions(np.asarray([ids]), [table[k].grid for k in keys] or None, self.model_config)
    key_per_token, local_per_token = [None] * len(ids), [-1] * len(ids)
    image_slots = iter(np.flatnonzero(np.asarray(ids) == self.tokenizer.image_pad_id))
    for k in keys:
      for i in range(table[k].num_tokens):
        t = next(image_slots)
        key_per_token[t], local_per_token[t] = k, i
    row.start(ids, pos[:, 0], key_per_token, local_per_token, keys)

  def _start_rows(self, examples, table, num_samples: int) -> tuple[list[Ledger], list[str]]:
    rows, skipped = [], []
    for group, example in enumerate(examples):
      try:
        keys = [self._add_image(table, img) for img in example.get("images", ())]
        head = self._first_text(example)
        ids, rendered = self._encode_prompt(head, keys, table)
        if len(ids) >= self.config.max_total_tokens:
          raise ValueError(f"prompt of {len(ids)} tokens leaves no room under max_total_tokens "
                           f"{self.config.max_total_tokens}")
      except (image_lib.ImageError, OSError, ValueError, KeyError) as e:
        log.warning("Skipping example %r: %s", example.get("id"), e)
        skipped.append(str(example.get("id")))
        continue
      image_refs = [f"prompt:{i}" for i in range(len(keys))]
      for s in range(num_samples):
        transcript = Transcript(str(example.get("id", group)),
                                len(rows) // num_samples, s, messages=[{
                                    "role": "user",
                                    "text": rendered,
                                    "images": image_refs
                                }])
        row = Ledger(
            len(rows) // num_samples, [], [], [], [], 0, [], transcript, task=example.get("task", "search"),
            question=example["question"], head=head, shown=list(zip(keys, image_refs)))
        self._start(row, ids, keys, table)
        rows.append(row)
    return rows, skipped

  def _restart(self, row: Ledger, table) -> tuple | None:
    """Single-turn layout: the row's next prompt (the chain so far, the image it shows now) as its new ledger."""
    keys, refs = [k for k, _ in row.shown], [r for _, r in row.shown]
    ids, rendered = self._encode_prompt(row.head + row.chain, keys, table)
    if len(ids) >= self.config.max_total_tokens:
      row.finish("max_tokens")
      return None
    self._start(row, ids, keys, table)
    row.transcript.messages.append({"role": "user", "text": rendered, "images": refs})
    return row.tokens, np.concatenate(row.positions, axis=1), row.image_key, row.image_local

  def _observation(self, action: actions_lib.Action, obs, table, turn: int):
    """One action's observation: its text tokens (cut to the limit), image key, transcript entry and text."""
    paper = self.config.agent_rules == "paper"
    text, image_key, ok, error = "", None, True, ""
    if action.kind == "problem":
      text = prompts.problem_tip(action.problems)
    elif obs is None:  # a code action without a program (paper rules): a failed call that shows nothing
      ok, error = False, action.error
    elif action.kind == "search":
      ok, error = bool(obs.ok), obs.error or ""
      body = obs.text or f"Error: {error}"
      text = body if body.lstrip().startswith("<information>") else prompts.search_observation(body)
    else:
      ok, error = bool(obs.ok), obs.error or ""
      if ok and obs.image is not None:
        try:
          image_key = self._add_image(table, obs.image)
        except (image_lib.ImageError, OSError, ValueError) as e:
          ok, error = False, f"the output image cannot be read: {e}"
      text = "" if paper else (obs.text or "").strip() or ("" if ok else f"Error: {error}")
    body = self.tokenizer.encode(text) if text else []
    truncated = len(body) > self.config.max_tool_output_tokens
    if truncated:
      cut = len(body) - self.config.max_tool_output_tokens
      body = body[:self.config.max_tool_output_tokens] + self.tokenizer.encode(TRUNCATION_NOTE.format(cut))
    ref = f"turn{turn}:output" if image_key is not None else None
    entry = {"kind": action.kind, "ok": ok, "error": error, "truncated": truncated, "image": ref}
    return body, image_key, entry, self.tokenizer.decode(body)

  def _chat_turn(self, row: Ledger, observed, table):
    """The user turn (as (tokens, image_key) pieces) that shows a turn's observations in the chat layout."""
    opening = self._turn_open[1:] if row.tokens[-1] == self.tokenizer.im_end_id else self._turn_open
    pieces = [(list(opening), None)]
    for body, image_key, _, _ in observed:
      if image_key is not None:
        n = table[image_key].num_tokens
        pieces += [([self.tokenizer.vision_start_id], None), ([self.tokenizer.image_pad_id] * n, image_key),
                   ([self.tokenizer.vision_end_id], None)]
      pieces.append((body, None))
    return pieces + [(list(self._turn_close), None)]

  def _place(self, pieces, start: int, table):
    """Flattens (tokens, image_key) pieces into tokens, M-RoPE positions and per-token image refs."""
    tokens, positions, keys, local = [], [], [], []
    for ids, key in pieces:
      if key is None:
        pos, start = rope.text_positions(start, len(ids))
        keys += [None] * len(ids)
        local += [-1] * len(ids)
      else:
        pos, start = rope.image_positions(start, table[key].grid, self.merge)
        keys += [key] * len(ids)
        local += list(range(len(ids)))
      tokens += ids
      positions.append(pos)
    return tokens, np.concatenate(positions, axis=1), keys, local, start

  # ---- device chunks ------------------------------------------------------------------------------------------

  def _extend(self, params, cache, news: Sequence[tuple | None], length: int, table):
    """Extends each row's cache with its new (tokens, positions, keys, local) chunk (None: nothing)."""
    batch = len(news)
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    positions = np.zeros((3, batch, length), np.int32)
    image_index = np.full((batch, length), -1, np.int32)
    rows = []
    for b, new in enumerate(news):
      if new is None:
        rows.append(batch_lib.Row(0, [], None, [], [], [], []))
        continue
      ids, pos, keys, local = new
      n = len(ids)
      tokens[b, :n], mask[b, :n], positions[:, b, :n] = ids, 1, pos
      rows.append(batch_lib.Row(0, ids, pos, [], [], keys, local))
    images = None
    if any(k is not None for r in rows for k in r.image_key):
      images, index = self._image_tables(rows, table)
      image_index[:, :index.shape[1]] = index
    return self.sampler.extend(params, cache, sampling.Chunk(tokens, positions, mask, image_index), images=images)

  def _prefill(self, params, news: Sequence[tuple | None], table):
    """A fresh cache holding each row's prompt chunk (None: an empty row)."""
    cache = self.sampler.new_cache(len(news), self.cache_len)
    length = max(len(n[0]) for n in news if n is not None)
    return self._extend(params, cache, news, min(sampling.bucket(length, self.config.length_buckets), self.cache_len),
                        table)

  def _repetition(self, rows: Sequence[Ledger], device_rows: int):
    """The sampler's repetition inputs: every row's ledger so far (-1 padded to the cache) and its penalty."""
    context = np.full((device_rows, self.cache_len), -1, np.int32)
    for b, r in enumerate(rows):
      context[b, :len(r.tokens)] = r.tokens
    return context, np.full((device_rows,), self.config.repetition_penalty, np.float32)

  # ---- the loop -----------------------------------------------------------------------------------------------

  def run(self, params, examples: Sequence[Mapping[str, Any]], rng: jax.Array, num_samples: int = 1,
          script: Callable[[int, int], Sequence[int] | None] | None = None) -> RolloutResult:
    """Rolls out `num_samples` trajectories per example; returns the training batch, transcripts and stats.

    Examples that cannot be prompted (unreadable image, prompt over the length limit) are skipped, counted in
    `stats['skipped']` and logged. `script(row, turn)`, optional, forces that row's tokens for that turn (entries
    < 0 and the rest of the turn are sampled): a scripted policy through the real sampler.
    """
    cfg = self.config
    timings = collections.Counter()
    encoded_before = self.images_encoded
    table: dict[str, ImageEntry] = {}
    rows, skipped = self._start_rows(examples, table, num_samples)
    if not rows:
      raise ValueError(f"No example could be prompted ({len(skipped)} skipped: {skipped[:5]}).")
    # On a mesh the device batch is padded with empty rows (never live) to a multiple of its row shards.
    shards = self.sampler.num_shards
    device_rows = -(-len(rows) // shards) * shards
    padding = [None] * (device_rows - len(rows))
    start = time.perf_counter()
    news = [(r.tokens, np.concatenate(r.positions, axis=1), r.image_key, r.image_local) for r in rows]
    logits, cache = self._prefill(params, news + padding, table)
    timings["prefill_s"] += time.perf_counter() - start

    max_turns = 1 if cfg.mode == "stepwise" else cfg.max_turns
    for turn in range(1, max_turns + 1):
      if turn > 1 and cfg.layout == "single_turn":  # every turn a new single-turn prompt, prefilled afresh
        start = time.perf_counter()
        news = [None if r.done else self._restart(r, table) for r in rows]
        if any(n is not None for n in news):
          del cache
          logits, cache = self._prefill(params, news + padding, table)
        timings["prefill_s"] += time.perf_counter() - start
      live = [b for b, r in enumerate(rows) if not r.done]
      if not live:
        break
      rng, key = jax.random.split(rng)
      budget = np.zeros((device_rows,), np.int32)
      for b in live:
        budget[b] = min(cfg.max_new_tokens, cfg.max_total_tokens - len(rows[b].tokens))
      forced = None
      if script is not None:
        forced = np.full((device_rows, cfg.max_new_tokens), -1, np.int32)
        for b in live:
          ids = list(script(b, turn) or ())[:cfg.max_new_tokens]
          forced[b, :len(ids)] = ids
      repetition = self._repetition(rows, device_rows) if cfg.repetition_penalty != 1.0 else None
      start = time.perf_counter()
      next_positions = [r.next_position for r in rows] + [0] * len(padding)
      out, cache = self.sampler.generate(params, cache, logits, next_positions, key, budget, forced, repetition)
      out = jax.device_get(out)
      timings["generate_s"] += time.perf_counter() - start

      calls, pending = [], []  # pending: (row, turn text, [(action, index into calls or None, crop override)])
      for b in live:
        row = rows[b]
        n = int(out.num_tokens[b])
        new = out.tokens[b, :n]
        pos, nxt = rope.text_positions(row.next_position, n)
        row.append(new, pos, nxt, sampled_logps=out.logps[b, :n])
        row.turns = turn
        text = self.tokenizer.decode(new)
        turn_text = self.tokenizer.decode(new, skip_special_tokens=True)
        row.transcript.messages.append({"role": "assistant", "text": text, "images": [], "plain": turn_text})
        actions = self._read(row, text, turn_text)
        row.transcript.actions.extend(actions)
        if not self._goes_on(row, actions[0], int(out.stop_reason[b]), turn, max_turns):
          continue
        acted = []
        for action in actions:
          if action.kind == "problem":  # a code call of the same turn already follows it (crop override)
            row.problems = action.problems
          call, overridden = self._tool_call(row, action, table, f"{b}:{turn}")
          acted.append((action, len(calls) if call is not None else None, overridden))
          if call is not None:
            calls.append(call)
        pending.append((b, turn_text, acted))
      if not pending:
        continue

      start = time.perf_counter()
      observations = list(self.executor.execute(calls)) if calls else []
      if len(observations) != len(calls):
        raise RuntimeError(f"The tool executor returned {len(observations)} observations for {len(calls)} calls.")
      timings["tools_s"] += time.perf_counter() - start

      news = [None] * device_rows
      for b, turn_text, acted in pending:
        news[b] = self._observe(rows[b], turn_text, acted, observations, table, turn)
      if cfg.layout == "single_turn" or not any(n is not None for n in news):
        continue
      start = time.perf_counter()
      chunk_len = sampling.bucket(max(len(n[0]) for n in news if n is not None), cfg.chunk_buckets)
      logits, cache = self._extend(params, cache, news, chunk_len, table)
      timings["extend_s"] += time.perf_counter() - start

    for r in rows:
      if not r.done:
        r.finish("max_turns")
      r.transcript.num_tokens = len(r.tokens)
    batch = self._batch(rows, table, len(examples) * num_samples, num_samples)
    return RolloutResult(batch, [r.transcript for r in rows], self._stats(rows, skipped, timings, encoded_before))

  def _read(self, row: Ledger, text: str, turn_text: str) -> list[actions_lib.Action]:
    """The turn's actions: varft's parser (one action), or the released scripts' rules (`paper_rules`)."""
    if self.config.agent_rules != "paper":
      return [actions_lib.parse_action(text)]
    actions = paper_rules.read_turn(turn_text, row.task, row.last_query)
    for action in actions:
      if action.kind == "search":
        row.last_query = action.content
    return actions

  def _goes_on(self, row: Ledger, action: actions_lib.Action, stop_reason: int, turn: int, max_turns: int) -> bool:
    """Ends the row when this turn ends it (answer, malformed, step-wise, last turn); True when its tools run."""
    cfg = self.config
    if action.kind == "malformed":
      if stop_reason == sampling.LENGTH:
        row.finish("max_tokens" if len(row.tokens) >= cfg.max_total_tokens else "max_new_tokens")
      else:
        row.finish("malformed")
    elif action.kind == "answer":
      row.finish("answer")
    elif cfg.mode == "stepwise":
      row.finish("step")
    elif turn == max_turns:
      row.finish("max_turns")
    return not row.done

  def _observe(self, row: Ledger, turn_text: str, acted, observations, table, turn: int):
    """Records a turn's observations: the chat layout's user turn (returned as the row's extend chunk), or the
    single-turn layout's next prompt text and image. None when nothing is to be extended."""
    observed = []
    for action, call_index, overridden in acted:
      obs = observations[call_index] if call_index is not None else None
      body, image_key, entry, body_text = self._observation(action, obs, table, turn)
      entry["crop_override"] = overridden
      row.transcript.observations.append(entry)
      if action.kind == "search" and not entry["ok"] and self.config.agent_rules == "paper":
        row.finish("tool_error")  # the released scripts drop the item on any search failure
        return None
      observed.append((body, image_key, entry, body_text))
    if self.config.layout == "single_turn":
      for (action, _, _), (_, image_key, entry, body_text) in zip(acted, observed):
        if self.config.agent_rules == "paper":
          row.chain += paper_rules.chain_step(turn_text, action, body_text)
        else:
          row.chain += f"\n{turn_text}" + (f"\n{body_text}" if body_text else "")
        if image_key is not None:  # the output image replaces the prompt's images
          row.shown = [(image_key, entry["image"])]
          row.transcript.images[entry["image"]] = table[image_key].pil
      return None
    pieces = self._chat_turn(row, observed, table)
    chunk_len = sum(len(ids) for ids, _ in pieces)
    if len(row.tokens) + chunk_len >= self.config.max_total_tokens or chunk_len > max(self.config.chunk_buckets):
      row.finish("max_tokens")
      return None
    ids, pos, keys, local, nxt = self._place(pieces, row.next_position, table)
    row.append(ids, pos, nxt, image_key=keys, image_local=local)
    refs = []
    for _, image_key, entry, _ in observed:
      if image_key is not None:
        row.images.append(image_key)
        row.transcript.images[entry["image"]] = table[image_key].pil
        refs.append(entry["image"])
    row.transcript.messages.append({"role": "user", "text": "".join(o[3] for o in observed), "images": refs})
    return ids, pos, keys, local

  def _tool_call(self, row: Ledger, action: actions_lib.Action, table, call_id: str):
    """(the call an action makes or None, whether the crop override changed its program)."""
    if action.kind == "search":
      return ToolCall("search", action.content, None, call_id), False
    if action.kind != "code" or not action.content:
      return None, False
    image = table[row.images[-1]].pil if row.images else None
    program, overridden = action.content, False
    box = code_lib.question_box(row.question) if self.config.crop_override else None
    if box is not None and image is not None and row.problems[:1] == ("crop",):
      program, count = code_lib.override_crop(program, box, *image.size)
      overridden = count > 0
    images = {"path_to_input_image.jpg": image} if image is not None else None
    return ToolCall("code", program, images, call_id), overridden

  def _stats(self, rows: Sequence[Ledger], skipped, timings, encoded_before: int) -> dict[str, Any]:
    transcripts = [r.transcript for r in rows]
    reasons = collections.Counter(t.stop_reason for t in transcripts)
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
        "images_encoded": self.images_encoded - encoded_before,
        "temperature": self.config.temperature,
        **{
            k: round(v, 4) for k, v in timings.items()
        },
    }

  # ---- the training batch -------------------------------------------------------------------------------------

  def _batch(self, rows: Sequence[Ledger], table, num_rows: int, num_samples: int) -> dict[str, Any]:
    """The `varft.batch` rollout batch: `num_rows` rows (the skipped prompts' rows empty; rounded up to a multiple
    of the training batch's devices), each device's images in its own table."""
    num_rows = -(-num_rows // self.batch_devices) * self.batch_devices
    length = sampling.bucket(max(len(r.tokens) for r in rows), self.config.length_buckets)
    images = {k: batch_lib.Image(e.patches, e.grid) for k, e in table.items()}
    return batch_lib.assemble([r.batch_row() for r in rows], images, num_rows=num_rows, num_samples=num_samples,
                              num_devices=self.batch_devices, length=length, vision_cfg=self.model_config.vision,
                              patch_buckets=self.config.patch_buckets, max_image_patches=self.max_image_patches)
