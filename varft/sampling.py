"""Jitted KV-cache sampler for the Qwen2.5-VL policy: extend (prefill) and decode with `lax.while_loop`.

Device programs, each compiled once per bucket shape:

* `extend`: appends a right-padded chunk of tokens (text and image embeddings) to every row of a fixed-size KV cache
  at that row's own offset and returns each row's last hidden state (the next-token state, below). Prefill is an
  extend of an empty cache.
* `generate`: samples up to `max_new_tokens` tokens per row (greedy, temperature, top-k, top-p; optionally with a
  per-row repetition penalty over the tokens the row has seen) and feeds each back through the decoder, stopping a
  row on an EOS id, on a stop string (matched on device as a suffix of token classes, see `StopTable`; an empty
  table stops on EOS / budget only), or when it exhausts its own token budget. A call may return early (after a
  traced number of steps, or once a number of rows stopped) and be resumed: the stop window carries over.
* `prefill`: P prompts into a fresh (P, T) cache, each copied into the cache rows that show it (a prompt's G
  samples share one prefill; the copy is a per-layer in-place scatter into the donated cache, which also resets a
  reused row).
* `extend` and `generate` over some rows only (`rows=`): those cache rows are gathered into a batch of b rows
  (`row_bucket`), run, and written back in place into the donated cache, so a program's cost scales with the rows
  it serves; the temporary is the b gathered rows (which rows, and when it is worth it: `varft.scheduler`).

Every sampled token, including the one that stopped the row, is written to the cache, so a rollout can extend the
same cache with the tool's observation and go on. Between programs a row's next-token state is its last hidden state
(B, D), not its (B, V) logits: `generate` computes the logits of the rows it decodes, step by step, so no
vocabulary-wide array is kept, gathered or written back (`empty_hidden`; `text.logits` of it gives the logits).
The cache is donated to every program. Which strings stop and which ids are EOS is the caller's (the agent's tags:
`varft.turns`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from varft import batch as batch_lib
from varft import sharding
from varft.buckets import bucket, power_of_two_bucket, row_bucket  # noqa: F401 (part of the sampler's API)
from varft.models.qwen25vl import model, text
from varft.models.qwen25vl.config import Qwen25VLConfig
from varft.sampling_draw import SamplingConfig, apply_repetition_penalty, sample, seen_tokens
from varft.stop_table import StopTable, make_stop_table, token_texts  # noqa: F401 (part of the sampler's API)

# Why a row stopped (`GenerateOutput.stop_reason`).
NOT_RUN, EOS, STOP_TAG, LENGTH = 0, 1, 2, 3


class Chunk(NamedTuple):
  """A right-padded chunk to append to the cache. Image tokens take their embedding from an image table: one flat
  table (M, E), or each device's own table (see `varft.batch`), rows [d B/D, (d+1) B/D) reading table d."""
  tokens: np.ndarray  # (B, T) int32
  positions: np.ndarray  # (3, B, T) int32, M-RoPE
  mask: np.ndarray  # (B, T) int32, 1 on real tokens (valid first)
  image_index: np.ndarray  # (B, T) int32, row of the (row's own) image table, -1 for text tokens


class GenerateOutput(NamedTuple):
  tokens: jax.Array  # (B, max_new_tokens) int32, row b's first num_tokens[b] are its sample
  logps: jax.Array  # (B, max_new_tokens) float32 sampler log-probs of those tokens
  num_tokens: jax.Array  # (B,) int32
  stop_reason: jax.Array  # (B,) int32: NOT_RUN, EOS, STOP_TAG, LENGTH
  stop_index: jax.Array  # (B,) int32: which stop string matched (-1 if none)
  next_positions: jax.Array  # (B,) int32: text position of the next token
  hidden: jax.Array  # (B, D) last hidden state after the last fed token: the next token's state
  steps: jax.Array  # () int32: decode steps this call ran


def _extend(params, cache, chunk: Chunk, image_embeds, images, hidden=None, *, model_config: Qwen25VLConfig):
  """Returns each row's last hidden state (B, D) and the cache; `hidden` (B, D), optional: the rows without tokens
  in `chunk` keep theirs (else they get padding's)."""
  cfg = model_config.text
  dtype = jnp.dtype(model_config.dtype)
  if images is not None:  # each device encodes its own rows' images (see `varft.batch`)
    image_embeds = batch_lib.encode_tables(lambda pv, vi: model.encode_images(params, model_config, pv, vi), *images)
  if image_embeds is not None and image_embeds.ndim == 3:
    embeds = text.embed_tokens(params["text"], chunk.tokens, dtype)
    rows = batch_lib.lookup_images(image_embeds.astype(dtype), chunk.image_index)
    embeds = jnp.where((chunk.image_index >= 0)[..., None], rows, embeds)
  else:
    embeds = model.embed(params, model_config, chunk.tokens, image_embeds, chunk.image_index)
  states, cache = text.forward(params["text"], cfg, embeds, chunk.positions, attention_mask=chunk.mask, cache=cache,
                               dtype=dtype, attention=model_config.attention)
  count = chunk.mask.sum(axis=1)
  last_hidden = jnp.take_along_axis(states, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
  return (last_hidden if hidden is None else jnp.where((count > 0)[:, None], last_hidden, hidden)), cache


def _prefill(params, cache, hidden, chunk: Chunk, image_embeds, images, source, *, model_config: Qwen25VLConfig):
  """Prefills the P prompts of `chunk` (P, T) into a fresh (P, T) cache and copies prompt `source[b]` into row b of
  `cache` and of `hidden` (B rows; `source[b] < 0`: row b is kept). The copy is a scatter per layer into the
  donated cache (the temporary is one layer of B x T slots, never a second cache)."""
  cfg = model_config.text
  prompts, length = chunk.tokens.shape
  fresh = text.init_cache(cfg, prompts, length, cache["k"].dtype)
  new_hidden, fresh = _extend(params, fresh, chunk, image_embeds, images, model_config=model_config)
  chosen = source >= 0
  source = jnp.maximum(source, 0)
  # Rows that keep their cache write past its end (dropped by the scatter).
  offsets = jnp.where(chosen, 0, cache["k"].shape[2]).astype(jnp.int32)

  def copy(layer, stacks):
    k, v = stacks
    return (text._write_rows(k, fresh["k"][layer][source], layer,
                             offsets), text._write_rows(v, fresh["v"][layer][source], layer, offsets))

  k, v = jax.lax.fori_loop(0, cfg.num_layers, copy, (cache["k"], cache["v"]))
  length = jnp.where(chosen, fresh["length"][source], cache["length"])
  return jnp.where(chosen[:, None], new_hidden[source], hidden), {"k": k, "v": v, "length": length}


def _take_state(state, rows):
  return jnp.take(state, rows, axis=0, mode="fill", fill_value=0)


def _put_state(state, rows, new):
  return state.at[rows].set(new, mode="drop")


def _extend_rows(params, cache, hidden, chunk: Chunk, image_embeds, images, rows, *, model_config: Qwen25VLConfig):
  """`_extend` of a chunk of b rows into cache rows `rows` (b,) only (an index past the cache: a padding row): those
  rows are gathered, extended and written back in place; the others and their hidden states are untouched."""
  new_hidden, sub = _extend(params, text.take_rows(cache, rows), chunk, image_embeds, images, _take_state(hidden, rows),
                            model_config=model_config)
  return _put_state(hidden, rows, new_hidden), text.put_rows(cache, rows, sub)


def _generate_rows(params, cache, hidden, rows, *args, model_config: Qwen25VLConfig, sampling: SamplingConfig):
  """`_generate` over cache rows `rows` (b,) only (gathered, decoded, written back in place); the per-row inputs
  and outputs are the b gathered rows', the returned hidden states all of the cache's rows."""
  out, sub = _generate(params, text.take_rows(cache, rows), _take_state(hidden, rows), *args, model_config=model_config,
                       sampling=sampling)
  return out._replace(hidden=_put_state(hidden, rows, out.hidden)), text.put_rows(cache, rows, sub)


def _generate(params, cache, hidden, next_positions, rng, budget, forced, token_bits, pattern_bits, repetition=None,
              recent=None, max_steps=None, exit_after=None, *, model_config: Qwen25VLConfig, sampling: SamplingConfig):
  """`repetition`: None, or (context (B, C) int32, penalty (B,) float32): the repetition penalty of each row over the
  tokens of its context and of everything it samples. `recent` (B, W) int32: the row's last tokens of this turn
  before the call (-1 = none), so that a stop string begun in an earlier call still stops. Traced scalars:
  `max_steps` (at most `max_new_tokens`) and `exit_after` (return once that many rows stopped in this call).
  `hidden` (B, D): each step computes its rows' logits from it, and carries the new one."""
  cfg = model_config.text
  dtype = jnp.dtype(model_config.dtype)
  batch = hidden.shape[0]
  window = pattern_bits.shape[1]
  eos = jnp.asarray(sampling.eos_ids, jnp.int32)
  max_steps = jnp.int32(sampling.max_new_tokens) if max_steps is None else jnp.minimum(
      max_steps, sampling.max_new_tokens)
  exit_after = jnp.int32(batch) if exit_after is None else exit_after
  done = budget <= 0

  def cond(state):
    step, stopped = state[0], state[5] & ~done
    return (step < max_steps) & ~jnp.all(state[5]) & (jnp.sum(stopped) < exit_after)

  def body(state):
    step, cache, last, positions, rng, done, tokens, logps, count, reason, stop_index, recent, seen = state
    rng, key = jax.random.split(rng)
    scores = text.logits(params["text"], cfg, last)
    scores = scores if seen is None else apply_repetition_penalty(scores, seen, repetition[1])
    token, logp = sample(scores, key, sampling, forced[:, step])
    live = ~done
    if seen is not None:
      seen = seen.at[jnp.arange(batch), token].set(seen[jnp.arange(batch), token] | live)
    token = jnp.where(live, token, 0)
    tokens = tokens.at[:, step].set(token)
    logps = logps.at[:, step].set(jnp.where(live, logp, 0.0))
    count = count + live
    recent = jnp.concatenate([recent[:, 1:], jnp.where(live, token_bits[token], 0)[:, None]], axis=1)
    tag_hits = jnp.all((recent[:, None, :] & pattern_bits[None]) == pattern_bits[None], axis=-1)  # (B, S)
    is_eos = jnp.any(token[:, None] == eos[None], axis=-1)
    is_tag = jnp.any(tag_hits, axis=-1) & ~is_eos
    out_of_budget = count >= budget
    reason = jnp.where(live & is_eos, EOS,
                       jnp.where(live & is_tag, STOP_TAG, jnp.where(live & out_of_budget, LENGTH, reason)))
    stop_index = jnp.where(live & is_tag, jnp.argmax(tag_hits, axis=-1).astype(jnp.int32), stop_index)
    # Feed the token (also a stopping one, so that the cache holds the whole sample) for the live rows only.
    embeds = text.embed_tokens(params["text"], token[:, None], dtype)
    pos3 = jnp.broadcast_to(positions[None, :, None], (3, batch, 1))
    new, cache = text.forward(params["text"], cfg, embeds, pos3, attention_mask=live[:, None].astype(jnp.int32),
                              cache=cache, dtype=dtype, attention=model_config.attention)
    last = jnp.where(live[:, None], new[:, 0], last)
    positions = positions + live
    done = done | (live & (is_eos | is_tag | out_of_budget))
    return step + 1, cache, last, positions, rng, done, tokens, logps, count, reason, stop_index, recent, seen

  seen = None if repetition is None else seen_tokens(repetition[0], cfg.vocab_size)
  if recent is None:
    bits = jnp.zeros((batch, window), jnp.int32)
  else:
    recent = recent[:, recent.shape[1] - window:]
    bits = jnp.where(recent >= 0, token_bits[jnp.maximum(recent, 0)], 0)
  steps = sampling.max_new_tokens
  state = (jnp.int32(0), cache, hidden, next_positions, rng, done, jnp.zeros(
      (batch, steps), jnp.int32), jnp.zeros((batch, steps), jnp.float32), jnp.zeros(
          (batch,), jnp.int32), jnp.zeros((batch,), jnp.int32), jnp.full((batch,), -1, jnp.int32), bits, seen)
  state = jax.lax.while_loop(cond, body, state)
  step, cache, hidden, positions, _, _, tokens, logps, count, reason, stop_index, _, _ = state
  return GenerateOutput(tokens, logps, count, reason, stop_index, positions, hidden, step), cache


# Module-level so that samplers with equal configs (e.g. a multi-turn and a step-wise engine) share programs.
_extend_jit = jax.jit(_extend, static_argnames=("model_config",), donate_argnums=(1,))
_generate_jit = jax.jit(_generate, static_argnames=("model_config", "sampling"), donate_argnums=(1,))
_prefill_jit = jax.jit(_prefill, static_argnames=("model_config",), donate_argnums=(1, 2))
_extend_rows_jit = jax.jit(_extend_rows, static_argnames=("model_config",), donate_argnums=(1, 2))
_generate_rows_jit = jax.jit(_generate_rows, static_argnames=("model_config", "sampling"), donate_argnums=(1, 2))
_PROGRAMS = (_extend_jit, _generate_jit, _prefill_jit, _extend_rows_jit, _generate_rows_jit)


class Sampler:
  """Jitted extend/generate for one model config and sampling config, optionally on a mesh.

  On a mesh the batch axis of the cache and of every per-row array is sharded over all the batch axes
  (`sharding.BATCH_AXES`), so each device decodes only its own rows, and the cache's KV heads over `tensor`.
  Parameters are used as given: on a rollout mesh, `rollout_sharding.sampling_params` (replicated or tensor-parallel).
  """

  def __init__(self, model_config: Qwen25VLConfig, sampling: SamplingConfig, stop_table: StopTable, *,
               mesh: jax.sharding.Mesh | None = None):
    self.model_config = model_config
    self.sampling = sampling
    self.stop_table = stop_table
    self.mesh = mesh
    self._token_bits = jnp.asarray(stop_table.token_bits)
    self._pattern_bits = jnp.asarray(stop_table.pattern_bits)

  @property
  def _batch_axes(self) -> tuple[str, ...]:
    return tuple(a for a in sharding.BATCH_AXES if a in self.mesh.axis_names)

  @property
  def num_shards(self) -> int:
    """Row shards: the device batch must be a multiple of this."""
    return 1 if self.mesh is None else int(np.prod([self.mesh.shape[a] for a in self._batch_axes]))

  def layout(self, shape: Sequence[int], batch_axis: int = 0, head_axis: int | None = None) -> NamedSharding:
    """Where an input of `shape` lives on the mesh: `batch_axis` over the batch axes, `head_axis` (KV heads) over
    `tensor` when it divides them (also the planner's abstract inputs)."""
    spec = [None] * len(shape)
    axes = self._batch_axes
    spec[batch_axis] = axes[0] if len(axes) == 1 else axes
    tensor = self.mesh.shape.get("tensor", 1)
    if head_axis is not None and tensor > 1 and shape[head_axis] % tensor == 0:
      spec[head_axis] = "tensor"
    return NamedSharding(self.mesh, P(*spec))

  def _shard(self, x, batch_axis: int = 0, head_axis: int | None = None):
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, self.layout(np.shape(x), batch_axis, head_axis))

  def new_cache(self, batch: int, max_len: int) -> text.KVCache:
    """An empty cache (compute dtype) of `max_len` slots per row, batch-sharded on the mesh."""
    if batch % self.num_shards:
      raise ValueError(f"a batch of {batch} rows cannot be split over the sampler's {self.num_shards} devices")
    cache = text.init_cache(self.model_config.text, batch, max_len, jnp.dtype(self.model_config.dtype))
    return {
        "k": self._shard(cache["k"], 1, 3),
        "v": self._shard(cache["v"], 1, 3),
        "length": self._shard(cache["length"])
    }

  def empty_hidden(self, batch: int) -> jax.Array:
    """(B, D) zeros (compute dtype), batch-sharded: the next-token state of rows that hold nothing yet (see
    `prefill`)."""
    return self._shard(np.zeros((batch, self.model_config.text.hidden_size), jnp.dtype(self.model_config.dtype)))

  @property
  def stop_window(self) -> int:
    """How many of a row's last tokens the stop strings look at (the width of `generate`'s `recent`)."""
    return int(self.stop_table.pattern_bits.shape[1])

  def _chunk(self, chunk: Chunk) -> Chunk:
    return Chunk(self._shard(np.asarray(chunk.tokens, np.int32)), self._shard(np.asarray(chunk.positions, np.int32), 1),
                 self._shard(np.asarray(chunk.mask, np.int32)), self._shard(np.asarray(chunk.image_index, np.int32)))

  def _rows(self, rows: Sequence[int], cache) -> jax.Array:
    """Cache row indices for a gathered program; -1 (padding) becomes an index past the cache's rows."""
    rows = np.asarray(rows, np.int32)
    return self._shard(np.where(rows < 0, cache["length"].shape[0], rows).astype(np.int32))

  def extend(self, params, cache, chunk: Chunk, image_embeds: jax.Array | None = None, images=None,
             hidden: jax.Array | None = None, rows: Sequence[int] | None = None):
    """Appends `chunk` to each row of `cache` (donated); returns (each row's last hidden state (B, D), new cache).

    Image tokens read `image_embeds` (a flat table), or `images = (pixel_values, vision_inputs)`: each device's
    image table (leading axis D, `varft.batch.image_tables`), encoded inside this program where it lives.
    `hidden` (B, D), optional: the rows without tokens in `chunk` keep theirs.
    `rows` (b,), optional: chunk row j goes to cache row `rows[j]` (-1: a padding row), and only those rows are
    computed (gathered, extended, written back in place; `hidden` (B, D) is then required and returned whole).
    The padded chunk is written whole at each row's length, so every row needs `length + T <= cache size`
    (rows without tokens included: they get scratch writes past their length).
    """
    if images is not None:
      images = jax.tree.map(self._shard, tuple(images))
    if rows is not None:
      return _extend_rows_jit(params, cache, hidden, self._chunk(chunk), image_embeds, images, self._rows(rows, cache),
                              model_config=self.model_config)
    return _extend_jit(params, cache, self._chunk(chunk), image_embeds, images, hidden, model_config=self.model_config)

  def prefill(self, params, cache, hidden, chunk: Chunk, source: Sequence[int], images=None):
    """Prefills the P prompts of `chunk` once each and puts prompt `source[b]` into row b (`source[b] = -1`: row b
    is kept as it is); a row that gets a prompt is reset to it. `cache` and `hidden` (B, D) are donated; returns
    (hidden, cache). P must be a multiple of `num_shards` (pad with empty prompts); `images` as for `extend`."""
    if images is not None:
      images = jax.tree.map(self._shard, tuple(images))
    return _prefill_jit(params, cache, hidden, self._chunk(chunk), None, images,
                        self._shard(np.asarray(source, np.int32)), model_config=self.model_config)

  def generate(self, params, cache, hidden, next_positions, rng, budget, forced: np.ndarray | None = None,
               repetition: tuple[np.ndarray, np.ndarray] | None = None, *, recent: np.ndarray | None = None,
               max_steps: int | None = None, exit_after: int | None = None,
               rows: Sequence[int] | None = None) -> tuple[GenerateOutput, text.KVCache]:
    """Samples up to `min(budget[b], max_new_tokens)` tokens for every row with `budget[b] > 0`.

    `hidden` (B, D) are the last hidden states from the last extend/prefill/generate (`out.hidden`),
    `next_positions` (B,) the text position of the first new token. `forced`
    (B, max_new_tokens), optional: where >= 0, that token is taken instead of a sampled one (teacher forcing
    through the same program; its log-prob and the stop rules apply as usual).
    `repetition` = (context (B, C) int32, penalty (B,) float), optional: each row's logits get transformers'
    repetition penalty (`apply_repetition_penalty`) over the tokens of its context (-1 = padding) and those it
    samples; penalty and context are traced (a fixed C compiles once); log-probs are those of the penalised logits.

    Resuming: the call returns after `max_steps` steps or once `exit_after` rows stopped in it (both traced: one
    program); `out.steps` says how many it ran. A row resumed mid-turn passes the last `stop_window` tokens it
    sampled in this turn as `recent` (B, stop_window) (-1 = none), and its budget and forced tokens offset by what
    it already sampled. Returns the output and the cache (donated) holding every sampled token. Rows with budget 0
    get a scratch write at slot `length`, so they need `length < cache size` if their cache is used again.

    `rows` (b,), optional: decode cache rows `rows` only (-1: padding, budget 0): every per-row input and output
    is then the b gathered rows', except `hidden` (B, D), taken and returned whole.
    """
    batch, steps = len(next_positions), self.sampling.max_new_tokens
    budget = np.minimum(np.asarray(budget, np.int32), steps)
    forced = np.full((batch, steps), -1, np.int32) if forced is None else np.asarray(forced, np.int32)
    if forced.shape != (batch, steps):
      raise ValueError(f"forced tokens have shape {forced.shape}, expected {(batch, steps)}")
    recent = np.full((batch, self.stop_window), -1, np.int32) if recent is None else np.asarray(recent, np.int32)
    if recent.shape != (batch, self.stop_window):
      raise ValueError(f"recent tokens have shape {recent.shape}, expected {(batch, self.stop_window)}")
    if repetition is not None:
      context, penalty = repetition
      repetition = (self._shard(np.asarray(context, np.int32)), self._shard(np.asarray(penalty, np.float32)))
    limits = np.int32(steps if max_steps is None else max_steps), np.int32(batch if exit_after is None else exit_after)
    args = (self._shard(np.asarray(next_positions, np.int32)), rng, self._shard(budget), self._shard(forced),
            self._token_bits, self._pattern_bits, repetition, self._shard(recent), *limits)
    if rows is not None:
      return _generate_rows_jit(params, cache, hidden, self._rows(rows, cache), *args, model_config=self.model_config,
                                sampling=self.sampling)
    return _generate_jit(params, cache, hidden, *args, model_config=self.model_config, sampling=self.sampling)

  @staticmethod
  def compile_count() -> int:
    """How many programs extend/generate hold, over all samplers (one per config and shape signature)."""
    return sum(program._cache_size() for program in _PROGRAMS)


def text_chunk(rows: Sequence[Sequence[int]], starts: Sequence[int], length: int) -> Chunk:
  """A right-padded text-only chunk of token rows, row b starting at text position `starts[b]`."""
  batch = len(rows)
  tokens = np.zeros((batch, length), np.int32)
  mask = np.zeros((batch, length), np.int32)
  positions = np.zeros((3, batch, length), np.int32)
  for b, (row, start) in enumerate(zip(rows, starts)):
    n = len(row)
    tokens[b, :n] = row
    mask[b, :n] = 1
    positions[:, b, :n] = np.arange(start, start + n, dtype=np.int32)
  return Chunk(tokens, positions, mask, np.full((batch, length), -1, np.int32))
