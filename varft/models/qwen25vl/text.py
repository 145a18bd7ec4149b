"""The Qwen2 language model of Qwen2.5-VL as pure functions over a parameter pytree.

Layers are stacked along a leading axis and run with `lax.scan` (one compiled layer, fast compiles, simple
sharding rules). Parameters:

    embed (V, D); norm (D,); lm_head (D, V) only when embeddings are untied
    layers: attn_norm (L, D); q/k/v: {w (L, D, heads*hd), b (L, heads*hd)}; o: {w (L, H*hd, D)};
            mlp_norm (L, D); gate/up: {w (L, D, F)}; down: {w (L, F, D)}

Their logical axes (`PARAM_AXES`, beside `init_params`) say how they are sharded.

`forward` runs a chunk of embeddings either stand-alone (prefill / training) or against a fixed-size KV cache that
it extends at per-row offsets (the sampler's extend and decode steps).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from varft import sharding
from varft.models.qwen25vl import attention as attention_lib
from varft.models.qwen25vl import rope
from varft.models.qwen25vl.config import TextConfig

Params = dict[str, Any]
KVCache = dict[str, jnp.ndarray]  # k, v: (L, B, S, KV, hd); length: (B,) tokens already in the cache per row

# The logical axes of every parameter `init_params` creates, in its tree (`lm_head` only with untied embeddings);
# `sharding` maps them to mesh axes by the config's rules. Norm scales name no axes: small, they stay whole.
PARAM_AXES: dict[str, Any] = {
    "embed": ("vocab", "embed"),
    "norm": (None,),
    "lm_head": ("embed", "vocab"),
    "layers": {
        "attn_norm": (None, None),
        "q": {
            "w": ("layers", "embed", "heads"),
            "b": ("layers", "heads")
        },
        "k": {
            "w": ("layers", "embed", "kv_heads"),
            "b": ("layers", "kv_heads")
        },
        "v": {
            "w": ("layers", "embed", "kv_heads"),
            "b": ("layers", "kv_heads")
        },
        "o": {
            "w": ("layers", "heads", "embed")
        },
        "mlp_norm": (None, None),
        "gate": {
            "w": ("layers", "embed", "mlp")
        },
        "up": {
            "w": ("layers", "embed", "mlp")
        },
        "down": {
            "w": ("layers", "mlp", "embed")
        },
    },
}


def init_params(rng: jax.Array, cfg: TextConfig, dtype=jnp.float32) -> Params:
  """Random parameters (normal, std 0.02; zero biases; unit norms), as transformers initialises them."""
  d, f, hd, nl = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
  q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
  keys = iter(jax.random.split(rng, 9))

  def normal(shape):
    return (0.02 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

  params = {
      "embed": normal((cfg.vocab_size, d)),
      "norm": jnp.ones((d,), dtype),
      "layers": {
          "attn_norm": jnp.ones((nl, d), dtype),
          "q": {
              "w": normal((nl, d, q_out)),
              "b": jnp.zeros((nl, q_out), dtype)
          },
          "k": {
              "w": normal((nl, d, kv_out)),
              "b": jnp.zeros((nl, kv_out), dtype)
          },
          "v": {
              "w": normal((nl, d, kv_out)),
              "b": jnp.zeros((nl, kv_out), dtype)
          },
          "o": {
              "w": normal((nl, q_out, d))
          },
          "mlp_norm": jnp.ones((nl, d), dtype),
          "gate": {
              "w": normal((nl, d, f))
          },
          "up": {
              "w": normal((nl, d, f))
          },
          "down": {
              "w": normal((nl, f, d))
          },
      },
  }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = normal((d, cfg.vocab_size))
  return params


def init_cache(cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """An empty KV cache holding up to `max_len` tokens per row."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "length": jnp.zeros((batch,), jnp.int32)}


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


def embed_tokens(params: Params, token_ids: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  embeds = jnp.take(params["embed"], token_ids, axis=0).astype(dtype)
  return sharding.constrain(embeds, ("batch", "length", "act_embed")) if embeds.ndim == 3 else embeds


def logits(params: Params, cfg: TextConfig, hidden: jnp.ndarray) -> jnp.ndarray:
  """Vocabulary logits (float32) of final hidden states `(..., D)`."""
  if cfg.tie_word_embeddings:
    return jnp.einsum("...d,vd->...v", hidden, params["embed"].astype(hidden.dtype), preferred_element_type=jnp.float32)
  return jnp.einsum("...d,dv->...v", hidden, params["lm_head"].astype(hidden.dtype), preferred_element_type=jnp.float32)


def _dense(x, p, dtype):
  y = x @ p["w"].astype(dtype)
  return y + p["b"].astype(dtype) if "b" in p else y


def _write_rows(stack: jnp.ndarray, new: jnp.ndarray, layer: jnp.ndarray, offsets: jnp.ndarray) -> jnp.ndarray:
  """Writes `new` (B, T, ...) into layer `layer` of the cache `stack` (L, B, S, ...), row b at slots
  `offsets[b] ..`: one scatter of the new rows into the stack itself (in place), never a copy of a layer.

  A half-precision cache is scattered as its 16-bit patterns: the write only moves bits, and XLA:CPU, which has
  no bf16 scatter, would otherwise widen the whole stack to float32 around it (the planner's CPU compile)."""
  batch, length = new.shape[:2]
  rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
  slots = offsets[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
  return _scatter(stack, (layer, rows, slots), new)


def _scatter(stack: jnp.ndarray, index: tuple, new: jnp.ndarray) -> jnp.ndarray:
  """`stack.at[index].set(new)` (indices past the end dropped), in place in a donated stack; a half-precision
  stack is scattered as its 16-bit patterns (see `_write_rows`)."""
  new = new.astype(stack.dtype)
  if stack.dtype.itemsize != 2:
    return stack.at[index].set(new, mode="drop")
  bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)
  return jax.lax.bitcast_convert_type(bits(stack).at[index].set(bits(new), mode="drop"), stack.dtype)


def take_rows(cache: KVCache, rows: jnp.ndarray) -> KVCache:
  """Cache rows `rows` (b,) as a cache of b rows; an index past the cache's rows gives an empty row."""
  take = lambda x, axis: jnp.take(x, rows, axis=axis, mode="fill", fill_value=0)
  return {"k": take(cache["k"], 1), "v": take(cache["v"], 1), "length": take(cache["length"], 0)}


def put_rows(cache: KVCache, rows: jnp.ndarray, new: KVCache) -> KVCache:
  """Writes the b rows of `new` into cache rows `rows` (b,), in place in a donated cache; indices past the cache's
  rows are dropped (`_scatter`)."""
  return {
      "k": _scatter(cache["k"], (slice(None), rows), new["k"]),
      "v": _scatter(cache["v"], (slice(None), rows), new["v"]),
      "length": cache["length"].at[rows].set(new["length"], mode="drop")
  }


def _layer(cfg: TextConfig, dtype, attention, x, layer_params, cos, sin, visibility, cache, offsets):
  """One decoder layer; `cache` = (layer index, k stack, v stack) or None. Returns (x, the updated stacks)."""
  batch, length, _ = x.shape
  hd = cfg.head_dim
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  h = rms_norm(x, layer_params["attn_norm"], cfg.rms_norm_eps)
  q = _dense(h, layer_params["q"], dtype).reshape(batch, length, cfg.num_heads, hd)
  k = _dense(h, layer_params["k"], dtype).reshape(batch, length, cfg.num_kv_heads, hd)
  v = _dense(h, layer_params["v"], dtype).reshape(batch, length, cfg.num_kv_heads, hd)
  q = sharding.constrain(q, ("batch", "length", "act_heads", None))
  q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
  if cache is not None:
    index, stack_k, stack_v = cache
    stack_k, stack_v = _write_rows(stack_k, k, index, offsets), _write_rows(stack_v, v, index, offsets)
    k, v = stack_k[index].astype(dtype), stack_v[index].astype(dtype)
    cache = (stack_k, stack_v)
  query_slot, key_valid = visibility
  attn = attention_lib.attend(q, k, v, query_slot, key_valid, attention, from_slot_zero=cache is None)
  x = x + attn.reshape(batch, length, -1) @ layer_params["o"]["w"].astype(dtype)
  x = sharding.constrain(x, ("batch", "length", "act_embed"))
  h = rms_norm(x, layer_params["mlp_norm"], cfg.rms_norm_eps)
  mlp = jax.nn.silu(_dense(h, layer_params["gate"], dtype)) * _dense(h, layer_params["up"], dtype)
  mlp = sharding.constrain(mlp, ("batch", "length", "act_mlp"))
  x = x + _dense(mlp, layer_params["down"], dtype)
  return sharding.constrain(x, ("batch", "length", "act_embed")), cache


def forward(params: Params, cfg: TextConfig, embeds: jnp.ndarray, positions: jnp.ndarray, *,
            attention_mask: jnp.ndarray | None = None, cache: KVCache | None = None, dtype=jnp.float32,
            remat: bool = False, attention: str = "auto") -> tuple[jnp.ndarray, KVCache | None]:
  """Runs the decoder over `embeds` (B, T, D) at M-RoPE `positions` (3, B, T).

  Without a cache, tokens attend causally within the chunk to the tokens that `attention_mask` (B, T) marks valid
  (left or right padding both work). With a cache, each row's valid chunk tokens (right-padded: valid first) are
  written at that row's `cache['length']` and attend to everything before them; the returned cache's length grows
  by the number of valid tokens. The caller keeps `length + T <= S`.

  `attention` names the implementation (see `attention.IMPLEMENTATIONS`); none of them materialises the whole
  (B, H, T, S) score tensor except `reference` / `dot_product`. Returns the final-norm hidden states (B, T, D) and
  the updated cache (None without a cache).
  """
  batch, length, _ = embeds.shape
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), jnp.int32)
  valid = attention_mask.astype(bool)
  cos, sin = rope.mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
  query_idx = jnp.arange(length, dtype=jnp.int32)
  if cache is None:
    offsets = None
    visibility = (jnp.broadcast_to(query_idx, (batch, length)), valid)
  else:
    offsets = cache["length"]
    new_length = offsets + valid.sum(axis=1).astype(jnp.int32)
    key_slot = jnp.arange(cache["k"].shape[2], dtype=jnp.int32)
    visibility = (offsets[:, None] + query_idx[None, :], key_slot[None, :] < new_length[:, None])

  if cache is None:

    def body(x, layer_params):
      return _layer(cfg, dtype, attention, x, layer_params, cos, sin, visibility, None, offsets)[0], None

    if remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    x, _ = jax.lax.scan(body, embeds.astype(dtype), params["layers"])
  else:
    # The whole cache rides in the scan's carry and each layer writes its new rows in place: scanning the cache as
    # xs -> ys would hold a second cache (the ys) while the first is read.
    def body(carry, scanned):
      x, stack_k, stack_v = carry
      layer_params, index = scanned
      x, (stack_k, stack_v) = _layer(cfg, dtype, attention, x, layer_params, cos, sin, visibility,
                                     (index, stack_k, stack_v), offsets)
      return (x, stack_k, stack_v), None

    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, new_k, new_v), _ = jax.lax.scan(body, (embeds.astype(dtype), cache["k"], cache["v"]),
                                        (params["layers"], layers))
  hidden = rms_norm(x, params["norm"], cfg.rms_norm_eps)
  if cache is None:
    return hidden, None
  return hidden, {"k": new_k, "v": new_v, "length": new_length}
