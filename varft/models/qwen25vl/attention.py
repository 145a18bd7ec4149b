"""Grouped-query attention of the text decoder, with implementations that never hold (B, H, T, S) scores at once.

Which keys a query sees is described by two small arrays instead of a (B, T, S) mask: `query_slot` (B, T), the
absolute slot of each query in the key sequence, and `key_valid` (B, S). Key `s` is visible to query `t` of row `b`
iff `key_valid[b, s] and s <= query_slot[b, t]` (causal, with left or right padding, and against a KV cache whose
rows are filled to different lengths). A query that sees no key gets the uniform average of all values (finite, as
the reference: such rows are padding and carry no loss).

Implementations (`Qwen25VLConfig.attention`):

* `reference`: the dense softmax over materialised (B, H, T, S) float32 scores (the original path; tests compare
  against it).
* `xla_chunked`: online softmax (float32) scanned over key chunks; each step is rematerialised in the backward
  pass, so only running max / denominator / accumulator are kept: O(B H T chunk) live scores.
* `dot_product`: `jax.nn.dot_product_attention` (XLA implementation), `cudnn`: the same with cuDNN's fused flash
  kernel (GPU, half precision; float32 compute falls back to `xla_chunked`).
* `pallas_flash`: the Pallas TPU flash-attention kernel for causal attention from slot 0 (training, reference
  log-probs); other calls (extend, decode against a cache) fall back to `xla_chunked`.
* `auto`: cuDNN on GPU, Pallas flash on TPU, chunked XLA elsewhere. A single query (a decode step) always takes the
  dense path: its scores are (B, H, 1, S).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from varft.models.qwen25vl.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

# A large finite negative rather than -inf: a row with no visible key (padding) gets uniform weights, not NaNs.
MASK_VALUE = -1e30
KEY_CHUNK = 512  # keys per online-softmax step of `xla_chunked`
_FLASH_BLOCK = 128  # the Pallas kernel's block length; sequence lengths must be multiples of it


def resolve(name: str, backend: str | None = None) -> str:
  """The concrete implementation of `name` on `backend` (default: JAX's default backend)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention {name!r} is not one of {IMPLEMENTATIONS}")
  if name != "auto":
    return name
  backend = backend or jax.default_backend()
  return {"gpu": "cudnn", "tpu": "pallas_flash"}.get(backend, "xla_chunked")


def visible(query_slot: jnp.ndarray, key_valid: jnp.ndarray, key_start: int | jnp.ndarray = 0,
            num_keys: int | None = None) -> jnp.ndarray:
  """(B, T, S') bool visibility of keys `key_start .. key_start + S'` (all keys by default)."""
  keys = key_valid.shape[1] if num_keys is None else num_keys
  slot = key_start + jnp.arange(keys)
  valid = key_valid if num_keys is None else jax.lax.dynamic_slice_in_dim(key_valid, key_start, keys, axis=1)
  return valid[:, None, :] & (slot[None, None, :] <= query_slot[:, :, None])


def attend(q, k, v, query_slot, key_valid, implementation: str = "auto", *, from_slot_zero: bool = False):
  """Attention output (B, T, H, hd) of q (B, T, H, hd) over k, v (B, S, KV, hd); H a multiple of KV.

  `from_slot_zero` (static): the queries are the keys (S == T, `query_slot` = 0 .. T-1), which lets the Pallas
  kernel use its causal mask.
  """
  impl = resolve(implementation)
  if impl == "pallas_flash" and not (from_slot_zero and q.shape[1] % _FLASH_BLOCK == 0):
    impl = "xla_chunked"
  if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
    impl = "xla_chunked"  # cuDNN's fused attention takes half precision only
  if q.shape[1] == 1 or (impl == "xla_chunked" and k.shape[1] <= KEY_CHUNK):
    impl = "reference"  # one decode query (or one chunk of keys): the dense scores are already small
  if impl == "reference":
    return _reference(q, k, v, visible(query_slot, key_valid))
  if impl == "xla_chunked":
    return _chunked(q, k, v, query_slot, key_valid, KEY_CHUNK)
  if impl in ("dot_product", "cudnn"):
    return _dot_product(q, k, v, query_slot, key_valid, "cudnn" if impl == "cudnn" else "xla")
  return _pallas_flash(q, k, v, key_valid)


def _grouped(q, num_kv_heads):
  batch, length, heads, hd = q.shape
  return q.reshape(batch, length, num_kv_heads, heads // num_kv_heads, hd)


def _reference(q, k, v, mask):
  batch, length, heads, hd = q.shape
  scores = jnp.einsum("btkgd,bskd->bkgts", _grouped(q, k.shape[2]), k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * hd ** -0.5, MASK_VALUE)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(batch, length, heads, hd)


def _chunked(q, k, v, query_slot, key_valid, chunk):
  """Online softmax over key chunks; padded keys (to a whole number of chunks) are invalid."""
  batch, length, heads, hd = q.shape
  keys, kv_heads = k.shape[1], k.shape[2]
  steps = -(-keys // chunk)
  pad = steps * chunk - keys
  if pad:
    k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
    key_valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
  qg = _grouped(q, kv_heads)
  k_chunks = k.reshape(batch, steps, chunk, kv_heads, hd).swapaxes(0, 1)
  v_chunks = v.reshape(batch, steps, chunk, kv_heads, hd).swapaxes(0, 1)

  @jax.checkpoint
  def step(carry, xs):
    running_max, denom, acc = carry
    k_c, v_c, start = xs
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_c, preferred_element_type=jnp.float32) * hd ** -0.5
    mask = visible(query_slot, key_valid, start, chunk)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    probs = jnp.exp(scores - new_max[..., None])
    rescale = jnp.exp(running_max - new_max)
    denom = denom * rescale + probs.sum(axis=-1)
    acc = acc * rescale[..., None] + jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), v_c,
                                                preferred_element_type=jnp.float32)
    return (new_max, denom, acc), None

  groups = heads // kv_heads
  init = (jnp.full((batch, kv_heads, groups, length), -jnp.inf,
                   jnp.float32), jnp.zeros((batch, kv_heads, groups, length),
                                           jnp.float32), jnp.zeros((batch, kv_heads, groups, length, hd), jnp.float32))
  starts = jnp.arange(steps, dtype=jnp.int32) * chunk
  (_, denom, acc), _ = jax.lax.scan(step, init, (k_chunks, v_chunks, starts))
  out = (acc / denom[..., None]).astype(q.dtype)  # denom >= 1: the running max term contributes exp(0)
  return jnp.moveaxis(out, 3, 1).reshape(batch, length, heads, hd)


def _dot_product(q, k, v, query_slot, key_valid, implementation):
  mask = visible(query_slot, key_valid)[:, None]  # (B, 1, T, S)
  if implementation == "cudnn":
    # cuDNN takes the mask as an additive bias; its flash kernel still never writes the (B, H, T, S) scores.
    bias = jnp.where(mask, 0.0, MASK_VALUE).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _pallas_flash(q, k, v, key_valid):
  """Causal attention from slot 0 with the Pallas TPU kernel; padded keys are segment 0, every query segment 1."""
  from jax.experimental.pallas.ops.tpu import flash_attention as flash  # TPU kernels: imported only when used

  batch, length, heads, hd = q.shape
  groups = heads // k.shape[2]
  to_heads = lambda x: jnp.repeat(x, groups, axis=2).swapaxes(1, 2) if groups > 1 else x.swapaxes(1, 2)
  segments = flash.SegmentIds(q=jnp.ones((batch, length), jnp.int32), kv=key_valid.astype(jnp.int32))
  block = max(size for size in (128, 256, 512) if length % size == 0)
  sizes = flash.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1, block_q_major_dkv=block,
                           block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block, block_k_major_dq=block,
                           block_k_dq=block, block_q_dq=block)
  out = flash.flash_attention(q.swapaxes(1, 2), to_heads(k), to_heads(v), segment_ids=segments, causal=True,
                              sm_scale=hd ** -0.5, block_sizes=sizes)
  return out.swapaxes(1, 2)
