"""Continuous batching of agent trajectories over the sampler's fixed set of device slots.

Each slot holds one trajectory's rows of the KV cache. A trajectory whose turn stops goes to its tools at once
(the executor's futures) while the other slots keep decoding; when its observations are ready it rejoins: one
extend of the ready rows only (gathered, see below), then it decodes again. A generate call
returns early (once a few rows stopped, or after `resume_steps` steps while tools are out) so that stopped rows
reach their tools and ready rows rejoin without waiting for the slowest row; no call waits for the slowest tool.
A finished trajectory's slot takes the next prompt (evaluation streams through fewer slots than items), and a
prompt's G samples share one prefill (copied into their G slots). Shapes are static: slots, the output buffer,
the length / chunk / prompt-count buckets; `max_steps` and `exit_after` are traced, so nothing recompiles.

Rows are computed only while they are live. An extend runs over the rows that rejoin, and a generate call over
the rows that decode (not those waiting on a tool, nor finished ones), gathered from their slots into a batch of
`sampling.row_bucket` rows (4, 6, 8, 12, 16, ...: the live rows fill at least 2/3 of it), run, and written back in
place into the donated cache (`Sampler.extend` / `generate` with `rows=`). A program's cost then follows the rows
it serves: on CPU, where the vocabulary matmul makes a step cost in proportion to its rows, that is the gain; on
an accelerator it saves each idle row's KV-cache reads. The gather is a temporary copy of those cache rows (bf16 at
3B with a 2k-token cache: 36 layers x 2 KV heads x 128 x 2 (k, v) x 2 bytes x 2048 = 75 MB a row), so a program
gathers only when its bucket is at most `GATHER_MAX_FRACTION` (3/4) of the slots: the copy stays under 3/4 of the
cache (at 3B, 64 slots of 2k: 3.6 GB beside the 4.8 GB cache, for the planner to add to the generate program),
and above it the rows run in place over every slot, where more than half of them are live (a limit of half left
in-place calls over mostly waiting slots, 0.755 live on the heterogeneous benchmark). A multi-shard mesh runs in
place: a gather across devices would move KV rows between them.

`schedule='lockstep'` keeps the previous engine's order (all rows decode until every row stopped, every tool of
the turn finishes, then all rows are extended) for comparison.
"""
from __future__ import annotations

import collections
from collections.abc import Sequence
import concurrent.futures
import time

import jax
import numpy as np

from varft import batch as batch_lib
from varft import sampling
from varft.models.qwen25vl import rope
from varft.trajectory import Ledger

SCHEDULES = ("continuous", "lockstep")
# A program over some rows gathers them (a temporary of that many cache rows) only up to this fraction of the
# slots; above it the program runs in place over every slot (see the module doc).
GATHER_MAX_FRACTION = 0.75


def prompt_buckets(shards: int, slots: int) -> list[int]:
  """Prompt counts a prefill is padded to: `shards` times powers of two, up to all slots."""
  sizes, n = [], shards
  while n < slots:
    sizes.append(n)
    n *= 2
  return sizes + [-(-slots // shards) * shards]


class Scheduler:
  """Runs trajectories (prompted `Ledger`s, in groups sharing a prompt) through `num_slots` device slots; the
  engine (`RolloutEngine`) owns the turn logic: `end_turn`, `observe`, `scripted_tokens`, `flush_calls`."""

  def __init__(self, engine, params, rng: jax.Array, num_slots: int):
    self.engine, self.params, self.rng = engine, params, rng
    self.sampler = engine.sampler
    self.config = engine.config
    self.slots: list[Ledger | None] = [None] * num_slots
    self.cache = self.sampler.new_cache(num_slots, engine.cache_len)
    # The rows' next-token states (`varft.sampling`): each program computes the logits of the rows it decodes.
    self.hidden = self.sampler.empty_hidden(num_slots)
    self.counts = collections.Counter()
    self.timings = collections.Counter()

  @property
  def lockstep(self) -> bool:
    return self.config.schedule == "lockstep"

  def _active(self) -> list[Ledger]:
    return [r for r in self.slots if r is not None and not r.done]

  def run(self, groups: Sequence[Sequence[Ledger]]) -> None:
    queue = collections.deque(groups)
    while True:
      self._admit(queue)
      self._rejoin()
      active = self._active()
      decoding = [r for r in active if not r.waiting]
      if decoding:
        self._decode(decoding, waiting=len(active) > len(decoding))
      elif active:
        self._wait_for_tools(active)
      elif not queue:
        return

  def _begin_turn(self, row: Ledger) -> None:
    row.turns += 1
    row.turn_start = len(row.tokens)

  # ---- device steps ---------------------------------------------------------------------------------------------

  def _admit(self, queue) -> None:
    """Puts the next prompts into free slots (a whole group or none) and prefills each prompt once."""
    free = [s for s, r in enumerate(self.slots) if r is None or r.done]
    prompts = []
    while queue and len(queue[0]) <= len(free):
      group = queue.popleft()
      slots = [free.pop(0) for _ in group]
      for slot, row in zip(slots, group):
        self.slots[slot], row.slot = row, slot
      prompts.append((self.engine.ledger_chunk(group[0]), slots))
      for row in group:
        self._begin_turn(row)
    if prompts:
      self._prefill(prompts)

  def _prefill(self, prompts) -> None:
    """One prefill of each (chunk, slots) prompt, copied into its slots (which are reset to it)."""
    start = time.perf_counter()
    shards = self.sampler.num_shards
    count = sampling.bucket(len(prompts), prompt_buckets(shards, len(self.slots)))
    length = min(sampling.bucket(max(len(c[0]) for c, _ in prompts), self.config.length_buckets), self.engine.cache_len)
    source = np.full((len(self.slots),), -1, np.int32)
    for p, (_, slots) in enumerate(prompts):
      source[slots] = p
    chunk, images = self._chunk([c for c, _ in prompts] + [None] * (count - len(prompts)), length)
    self.hidden, self.cache = self.sampler.prefill(self.params, self.cache, self.hidden, chunk, source, images)
    self.counts["prefill_tokens"] += sum(len(c[0]) for c, _ in prompts)
    self.timings["prefill_s"] += time.perf_counter() - start

  def _chunk(self, news, length: int):
    """A right-padded chunk of (tokens, positions, image keys, image-local indices) rows (None: empty) and the
    image tables its images need (None: text only)."""
    batch = len(news)
    tokens, mask = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
    positions, image_index = np.zeros((3, batch, length), np.int32), np.full((batch, length), -1, np.int32)
    rows = []
    for b, new in enumerate(news):
      if new is None:
        rows.append(batch_lib.Row(0, [], None, [], [], [], []))
        continue
      ids, pos, keys, local = new
      tokens[b, :len(ids)], mask[b, :len(ids)], positions[:, b, :len(ids)] = ids, 1, pos
      rows.append(batch_lib.Row(0, ids, pos, [], [], keys, local))
    images = None
    if any(k is not None for r in rows for k in r.image_key):
      images, index = self.engine.images.device_tables(rows, self.sampler.num_shards)
      image_index[:, :index.shape[1]] = index
    return sampling.Chunk(tokens, positions, mask, image_index), images

  def _gathered(self, slots: Sequence[int]) -> np.ndarray | None:
    """The cache rows (padded with -1 to `sampling.row_bucket`) a program over `slots` runs on, gathered; None:
    in place over every slot (lock-step, a multi-shard mesh, or a bucket over `GATHER_MAX_FRACTION` of them)."""
    if self.lockstep or self.sampler.num_shards > 1:
      return None
    size = sampling.row_bucket(len(slots))
    if size > GATHER_MAX_FRACTION * len(self.slots):
      return None
    rows = np.full((size,), -1, np.int32)
    rows[:len(slots)] = slots
    return rows

  def _rejoin(self) -> None:
    """Rows whose observations are all in: record them and extend those rows (or prefill a single-turn prompt)."""
    active = self._active()
    ready = [r for r in active if r.waiting and all(f.done() for _, f, _ in r.waiting)]
    if self.lockstep and len(ready) < len(active):  # lock-step: only once every row waits and every tool is done
      return
    decoding = any(not r.waiting for r in active)
    if decoding and len(ready) < self.config.rejoin_fraction * len(active):  # too few for an extend yet
      return
    extended, prompts = {}, []
    for row in ready:
      kind, new = self.engine.observe(row)
      if row.done:
        continue
      if kind == "prefill":
        prompts.append((new, [row.slot]))
      else:
        extended[row.slot] = new
      self._begin_turn(row)
    if prompts:
      self._prefill(prompts)
    if extended:
      self._extend(extended)

  def _extend(self, extended: dict[int, tuple]) -> None:
    """One extend of the slots' new chunks: over those rows gathered, or in place over every slot."""
    start = time.perf_counter()
    rows = self._gathered(sorted(extended))
    if rows is None:
      news = [extended.get(s) for s in range(len(self.slots))]
    else:
      news = [extended.get(int(s)) for s in rows]
    length = sampling.bucket(max(len(n[0]) for n in extended.values()), self.config.chunk_buckets)
    chunk, images = self._chunk(news, length)
    self.hidden, self.cache = self.sampler.extend(self.params, self.cache, chunk, images=images, hidden=self.hidden,
                                                  rows=rows)
    self.counts["extends"] += 1
    self.counts["extend_rows"] += len(news)
    self.timings["extend_s"] += time.perf_counter() - start

  def _decode(self, decoding: Sequence[Ledger], waiting: bool) -> None:
    """One generate call over the `decoding` rows gathered, or in place over every slot (only `decoding` rows
    live); stopped turns go to the engine."""
    cfg = self.config
    rows = self._gathered(sorted(r.slot for r in decoding))
    slots = len(self.slots) if rows is None else len(rows)
    index = {r.slot: r.slot for r in decoding} if rows is None else {int(s): j for j, s in enumerate(rows)}
    budget, next_positions = np.zeros((slots,), np.int32), np.zeros((slots,), np.int32)
    recent = np.full((slots, self.sampler.stop_window), -1, np.int32)
    forced = None
    for row in decoding:
      s = index[row.slot]
      budget[s] = min(cfg.max_new_tokens - len(row.turn_tokens), cfg.max_total_tokens - len(row.tokens))
      next_positions[s] = row.next_position
      tail = row.turn_tokens[-self.sampler.stop_window:]
      recent[s, recent.shape[1] - len(tail):] = tail
      script = self.engine.scripted_tokens(row)
      if script is not None:
        forced = np.full((slots, cfg.max_new_tokens), -1, np.int32) if forced is None else forced
        script = list(script)[:cfg.max_new_tokens]
        forced[s, :len(script)] = script
    repetition = None
    if cfg.repetition_penalty != 1.0:
      context = np.full((slots, self.engine.cache_len), -1, np.int32)
      for row in decoding:
        context[index[row.slot], :len(row.tokens)] = row.tokens
      repetition = context, np.full((slots,), cfg.repetition_penalty, np.float32)
    if self.lockstep:
      exit_after, max_steps = slots, cfg.max_new_tokens
    else:
      exit_after = max(1, int(np.ceil(len(decoding) * cfg.exit_fraction)))
      max_steps = cfg.resume_steps if waiting else cfg.max_new_tokens
    self.rng, key = jax.random.split(self.rng)
    start = time.perf_counter()
    out, self.cache = self.sampler.generate(self.params, self.cache, self.hidden, next_positions, key, budget, forced,
                                            repetition, recent=recent, max_steps=max_steps, exit_after=exit_after,
                                            rows=rows)
    self.hidden = out.hidden  # on the device
    tokens, logps, counts, reasons, tags, steps = jax.device_get(
        (out.tokens, out.logps, out.num_tokens, out.stop_reason, out.stop_index, out.steps))
    self.timings["generate_s"] += time.perf_counter() - start
    self.counts["generate_calls"] += 1
    self.counts["decode_steps"] += int(steps)
    self.counts["slot_steps"] += int(steps) * slots
    self.counts["occupied_slot_steps"] += int(steps) * (len(self._active()) if rows is None else len(decoding))
    self.counts["live_slot_steps"] += int(counts.sum())
    for row in decoding:
      s = index[row.slot]
      n = int(counts[s])
      pos, nxt = rope.text_positions(row.next_position, n)
      row.append(tokens[s, :n], pos, nxt, sampled_logps=logps[s, :n])
      if int(reasons[s]) != sampling.NOT_RUN or budget[s] <= 0:
        self.engine.end_turn(row, int(reasons[s]) if budget[s] > 0 else sampling.LENGTH, int(tags[s]))
    self.engine.flush_calls()

  def _wait_for_tools(self, active: Sequence[Ledger]) -> None:
    start = time.perf_counter()
    futures = [f for r in active for _, f, _ in r.waiting if not f.done()]
    when = concurrent.futures.ALL_COMPLETED if self.lockstep else concurrent.futures.FIRST_COMPLETED
    concurrent.futures.wait(futures, return_when=when)
    self.timings["tools_wait_s"] += time.perf_counter() - start
