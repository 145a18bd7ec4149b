"""Block-sparse attention for the vision tower: queries in blocks of `block` patches, each attending only to a static
list of key blocks, restricted to equal segment ids (the window or frame of each patch).

An online softmax in float32 is scanned over the key blocks `chunk` at a time, so no (P, P) score matrix exists;
the backward pass (a custom VJP) recomputes each step's probabilities from the saved log-sum-exp, flash-attention
style. Key-block lists are padded with the index of an appended empty block whose segment matches nothing.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEVER = -2  # segment id of the empty key block that pads key-block lists


class _Blocks(NamedTuple):
  """Blocked views of one attention call: queries, keys/values with an empty block appended (index nb), the key
  block list of every step (steps, nb, chunk), and the segment ids."""
  q: jnp.ndarray  # (nb, block, H, hd)
  k: jnp.ndarray  # (nb + 1, block, H, hd)
  v: jnp.ndarray
  query_segment: jnp.ndarray  # (nb, block)
  key_segment: jnp.ndarray  # (nb + 1, block)
  steps: jnp.ndarray  # (steps, nb, chunk) int32


def _blocks(q, k, v, segment, key_blocks, block, chunk) -> _Blocks:
  length, heads, hd = q.shape
  nb = length // block
  steps = -(-key_blocks.shape[1] // chunk)
  key_blocks = jnp.pad(key_blocks, [(0, 0), (0, steps * chunk - key_blocks.shape[1])], constant_values=nb)

  def with_empty_block(x, fill):
    x = x.reshape((nb, block) + x.shape[1:])
    return jnp.concatenate([x, jnp.full((1,) + x.shape[1:], fill, x.dtype)])

  return _Blocks(q.reshape(nb, block, heads, hd), with_empty_block(k, 0), with_empty_block(v, 0),
                 segment.reshape(nb, block), with_empty_block(segment, _NEVER),
                 key_blocks.reshape(nb, steps, chunk).transpose(1, 0, 2))


def _gather(x, index):  # (nb + 1, block, ...) at (nb, chunk) -> (nb, chunk * block, ...)
  x = x[index]
  return x.reshape((index.shape[0], -1) + x.shape[3:])


def _step_scores(b: _Blocks, index):
  """float32 scores (nb, H, block, chunk * block) of one step, -inf where the segments differ."""
  scores = jnp.einsum("nqhd,nkhd->nhqk", b.q, _gather(b.k, index), preferred_element_type=jnp.float32)
  visible = (b.query_segment[:, :, None] == _gather(b.key_segment, index)[:, None, :])[:, None]
  return jnp.where(visible, scores * b.q.shape[-1] ** -0.5, -jnp.inf)


def _blocked_forward(q, k, v, segment, key_blocks, block, chunk):
  """(output (length, H, hd), log-sum-exp (nb, H, block); +inf for rows that see no key)."""
  b = _blocks(q, k, v, segment, key_blocks, block, chunk)
  nb, _, heads, hd = b.q.shape

  def step(carry, index):
    running_max, denom, acc = carry
    scores = _step_scores(b, index)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(scores - shift[..., None])
    rescale = jnp.exp(running_max - shift)
    denom = denom * rescale + probs.sum(axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum("nhqk,nkhd->nhqd", probs.astype(v.dtype), _gather(b.v, index),
                                                preferred_element_type=jnp.float32)
    return (new_max, denom, acc), None

  init = (jnp.full((nb, heads, block), -jnp.inf, jnp.float32), jnp.zeros(
      (nb, heads, block), jnp.float32), jnp.zeros((nb, heads, block, hd), jnp.float32))
  (row_max, denom, acc), _ = jax.lax.scan(step, init, b.steps)
  seen = denom > 0
  out = acc / jnp.where(seen, denom, 1.0)[..., None]
  lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), jnp.inf)
  return out.transpose(0, 2, 1, 3).reshape(q.shape).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def blocked_attention(q, k, v, segment, key_blocks, block, chunk):
  """Attention of each block of `block` queries over the key blocks `key_blocks` (nb, K) (index nb: none),
  restricted to equal segment ids. Online softmax in float32, scanned over the key blocks `chunk` at a time; the
  backward pass recomputes each step's probabilities from the saved log-sum-exp (flash-attention style), so
  neither scores nor per-step accumulators are kept.

  q, k, v: (nb * block, H, hd); segment: (nb * block,). Rows with no visible key get zeros.
  """
  return _blocked_forward(q, k, v, segment, key_blocks, block, chunk)[0]


def _blocked_attention_fwd(q, k, v, segment, key_blocks, block, chunk):
  out, lse = _blocked_forward(q, k, v, segment, key_blocks, block, chunk)
  return out, (q, k, v, segment, key_blocks, out, lse)


def _blocked_attention_bwd(block, chunk, residuals, d_out):
  q, k, v, segment, key_blocks, out, lse = residuals
  b = _blocks(q, k, v, segment, key_blocks, block, chunk)
  nb, _, heads, hd = b.q.shape
  d_out = d_out.reshape(b.q.shape)
  row_dot = jnp.einsum("nqhd,nqhd->nhq", d_out.astype(jnp.float32), out.reshape(b.q.shape).astype(jnp.float32))

  def step(carry, index):
    dq, dk, dv = carry
    probs = jnp.exp(_step_scores(b, index) - lse[..., None])  # (nb, H, block, chunk * block)
    dv_step = jnp.einsum("nhqk,nqhd->nkhd", probs.astype(v.dtype), d_out.astype(v.dtype),
                         preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("nqhd,nkhd->nhqk", d_out.astype(v.dtype), _gather(b.v, index),
                         preferred_element_type=jnp.float32)
    d_scores = (probs * (d_probs - row_dot[..., None]) * hd ** -0.5).astype(q.dtype)
    dq = dq + jnp.einsum("nhqk,nkhd->nqhd", d_scores, _gather(b.k, index), preferred_element_type=jnp.float32)
    dk_step = jnp.einsum("nhqk,nqhd->nkhd", d_scores, b.q, preferred_element_type=jnp.float32)
    scatter = lambda acc, x: acc.at[index].add(x.reshape(index.shape + (block, heads, hd)))
    return (dq, scatter(dk, dk_step), scatter(dv, dv_step)), None

  zeros = lambda n: jnp.zeros((n, block, heads, hd), jnp.float32)
  (dq, dk, dv), _ = jax.lax.scan(step, (zeros(nb), zeros(nb + 1), zeros(nb + 1)), b.steps)
  as_input = lambda x, like: x[:nb].reshape(like.shape).astype(like.dtype)
  return as_input(dq, q), as_input(dk, k), as_input(dv, v), None, None


blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def window_key_blocks(nb: int) -> jnp.ndarray:
  """A window spans at most two consecutive blocks: each query block visits itself and both neighbours."""
  run = jnp.arange(nb)[:, None] + jnp.arange(-1, 2)[None, :]
  return jnp.where((run >= 0) & (run < nb), run, nb)
