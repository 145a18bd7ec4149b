"""Drawing a token from next-token logits: greedy, temperature, top-k / top-p, transformers' repetition penalty.

`SamplingConfig` says how tokens are drawn; `sample` is one decode step's draw inside `varft.sampling`'s generate
program; the full-vocabulary draw is an inverse CDF with one uniform per row (`categorical_from_weights`), which
on CPU is much cheaper than `jax.random.categorical`'s B x V random numbers.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable those filters.

  `max_new_tokens` is the (static) length of the output buffer of one `generate` call; each row may also get a
  smaller budget of its own. Log-probs are those of the temperature-scaled distribution before top-k/top-p
  truncation (`log_softmax(logits / temperature)`; the raw `log_softmax(logits)` when greedy).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 512  # the config's rollout.max_new_tokens
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def first_argmax(x):
  """argmax over the last axis (first maximum), as two plain reductions: much faster on CPU than a variadic one."""
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def cdf_block(vocab: int, target: int = 256) -> int:
  """Block length of the two-level CDF: a divisor of `vocab` near `target` when there is one, because padding the
  vocabulary to whole blocks copies the (B, V) array every step."""
  divisors = [size for size in range(32, 4 * target + 1) if vocab % size == 0]
  return min(divisors, key=lambda size: abs(size - target)) if divisors else target


def categorical_from_weights(rng, weights, block: int | None = None):
  """One draw per row with probability proportional to `weights` (B, V) >= 0, by inverse CDF with a single uniform
  per row.

  Equivalent to `jax.random.categorical` in distribution, but draws B random numbers instead of B x V (threefry over
  a 152k vocabulary dominates a CPU decode step). The CDF is taken in two levels (block masses, then within the
  chosen block) so that both cumulative sums stay short.
  """
  batch, vocab = weights.shape
  block = block or cdf_block(vocab)
  blocks = -(-vocab // block)
  if blocks * block != vocab:
    weights = jnp.pad(weights, ((0, 0), (0, blocks * block - vocab)))
  weights = weights.reshape(batch, blocks, block)
  cum_blocks = jnp.cumsum(weights.sum(axis=-1), axis=-1)  # (B, blocks)
  u = jax.random.uniform(rng, (batch,)) * cum_blocks[:, -1]
  b = jnp.minimum(jnp.sum(cum_blocks <= u[:, None], axis=-1), blocks - 1)
  before = jnp.where(b > 0, jnp.take_along_axis(cum_blocks, jnp.maximum(b - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
  inner = jnp.take_along_axis(weights, b[:, None, None], axis=1)[:, 0]  # (B, block)
  i = jnp.sum(jnp.cumsum(inner, axis=-1) <= (u - before)[:, None], axis=-1)
  # Rounding may push `i` past the block's last token of non-zero probability: clamp to it.
  last = jnp.max(jnp.where(inner > 0, jnp.arange(block), 0), axis=-1)
  return (b * block + jnp.minimum(i, last)).astype(jnp.int32)


def categorical(rng, logits, block: int | None = None):
  """One draw per row from softmax(logits) (B, V); see `categorical_from_weights`."""
  return categorical_from_weights(rng, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), block)


def apply_repetition_penalty(logits, seen, penalty):
  """transformers' repetition penalty: the logit of every token a row has already seen (`seen` (B, V) bool) is
  divided by the row's `penalty` (B,) when positive, multiplied by it otherwise; 1 leaves the row unchanged."""
  p = penalty[:, None].astype(logits.dtype)
  return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def seen_tokens(context, vocab: int):
  """(B, V) bool: which token ids occur in each row of `context` (B, C) int32 (entries < 0 are padding)."""
  batch = context.shape[0]
  ids = jnp.where(context >= 0, context, vocab)  # padding lands out of range and is dropped
  return jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], ids].set(True, mode="drop")


def sample(logits, rng, sampling, forced):
  """One token per row (the forced one where `forced >= 0`) and its log-prob under the temperature-scaled
  distribution (the raw one when greedy)."""
  scaled = logits if sampling.greedy else logits / sampling.temperature
  # log p = shifted - log_norm, gathered at the chosen token only: no (B, V) log-softmax is written, and the full-
  # vocabulary draw reuses the same exponentials.
  shifted = scaled - jnp.max(scaled, axis=-1, keepdims=True)
  weights = jnp.exp(shifted)
  log_norm = jnp.log(jnp.sum(weights, axis=-1))
  if sampling.greedy:
    token = first_argmax(logits)
  elif sampling.top_k or sampling.top_p < 1:
    k = sampling.top_k or logits.shape[-1]
    values, indices = jax.lax.top_k(scaled, k)  # sorted, descending
    if sampling.top_p < 1:
      probs = jax.nn.softmax(values, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs
      values = jnp.where(before < sampling.top_p, values, -jnp.inf)
    choice = categorical(rng, values)
    token = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  else:
    token = categorical_from_weights(rng, weights)
  token = jnp.where(forced >= 0, forced, token)
  logp = jnp.take_along_axis(shifted, token[:, None], axis=-1)[:, 0] - log_norm
  return token, logp
