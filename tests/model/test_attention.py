"""Memory-efficient attention against the dense reference: padding on either side, the KV cache, the Pallas kernel
(interpret mode on CPU), and the vision tower's window / full block masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varft.models.qwen25vl import attention, block_attention, text, vision
from varft.models.qwen25vl.config import PRESETS

B, H, KV, HD = 3, 4, 2, 16
# bf16 inputs and matmuls against the float32 reference: errors of a few bf16 ulps of O(1) outputs.
BF16_ATOL = 3e-2


def _qkv(rng, t, s, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(rng), 3)
  q = jax.random.normal(keys[0], (B, t, H, HD), dtype)
  k = jax.random.normal(keys[1], (B, s, KV, HD), dtype)
  v = jax.random.normal(keys[2], (B, s, KV, HD), dtype)
  return q, k, v


def _dense_mask(query_slot, key_valid):
  """The mask as text.forward built it before: causal by slot and valid keys, (B, T, S)."""
  s = key_valid.shape[1]
  return np.asarray(key_valid)[:, None, :] & (np.arange(s)[None, None, :] <= np.asarray(query_slot)[:, :, None])


def _padding(t, side):
  lengths = np.array([t, t - 5, t - 11])
  idx = np.arange(t)
  valid = idx[None] < lengths[:, None] if side == "right" else idx[None] >= (t - lengths)[:, None]
  return jnp.asarray(np.broadcast_to(idx, (B, t)), jnp.int32), jnp.asarray(valid)


def _seen(query_slot, key_valid):
  """Queries that see at least one key (the others are padding: any finite output will do)."""
  return _dense_mask(query_slot, key_valid).any(axis=-1)


@pytest.fixture
def small_chunks(monkeypatch):
  monkeypatch.setattr(attention, "KEY_CHUNK", 16)  # several chunks, and one partial, at test sizes


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["xla_chunked", "dot_product", "cudnn"])  # cudnn: fp32 falls back
def test_training_attention_matches_reference_with_padding(impl, side, small_chunks):
  t = 40
  q, k, v = _qkv(0, t, t)
  slot, valid = _padding(t, side)
  want = attention._reference(q, k, v, jnp.asarray(_dense_mask(slot, valid)))
  got = attention.attend(q, k, v, slot, valid, impl, from_slot_zero=True)
  seen = _seen(slot, valid)
  np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], atol=1e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(got)).all()


def test_chunked_attention_gradients_match_reference(small_chunks):
  t = 40
  q, k, v = _qkv(1, t, t)
  slot, valid = _padding(t, "right")
  weight = jnp.asarray(_seen(slot, valid), jnp.float32)[..., None, None]
  mask = jnp.asarray(_dense_mask(slot, valid))
  loss = lambda f: lambda q, k, v: jnp.sum(weight * jnp.sin(f(q, k, v)))
  want = jax.grad(loss(lambda q, k, v: attention._reference(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda q, k, v: attention._chunked(q, k, v, slot, valid, 16)), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_chunked_attention_in_bf16_is_within_tolerance(small_chunks):
  t = 40
  q, k, v = _qkv(2, t, t)
  slot, valid = _padding(t, "left")
  want = attention._reference(q, k, v, jnp.asarray(_dense_mask(slot, valid)))
  got = attention.attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), slot, valid, "xla_chunked")
  assert got.dtype == jnp.bfloat16
  seen = _seen(slot, valid)
  np.testing.assert_allclose(np.asarray(got, np.float32)[seen], np.asarray(want)[seen], atol=BF16_ATOL)


@pytest.mark.parametrize("t", [1, 7])
def test_cached_attention_matches_reference(t, small_chunks):
  """Extend (t > 1) and decode (t = 1) against a 64-slot cache filled to a different length per row."""
  s = 64
  q, k, v = _qkv(3, t, s)
  offsets = jnp.asarray([0, 20, 50], jnp.int32)
  new_length = offsets + jnp.asarray([t, t - 1 if t > 1 else 1, t], jnp.int32)
  slot = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  valid = jnp.arange(s)[None] < new_length[:, None]
  want = attention._reference(q, k, v, jnp.asarray(_dense_mask(slot, valid)))
  for impl in ("xla_chunked", "dot_product", "pallas_flash"):  # flash falls back to chunked against a cache
    got = attention.attend(q, k, v, slot, valid, impl)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=impl)


def test_pallas_flash_kernel_matches_reference_in_interpret_mode():
  from jax.experimental.pallas import tpu as pltpu

  t = 128  # the kernel's block length
  q, k, v = _qkv(4, t, t)
  slot, valid = _padding(t, "right")
  want = attention._reference(q, k, v, jnp.asarray(_dense_mask(slot, valid)))
  with pltpu.force_tpu_interpret_mode():
    got = attention.attend(q, k, v, slot, valid, "pallas_flash", from_slot_zero=True)
  seen = _seen(slot, valid)
  np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(want)[seen], atol=1e-5, rtol=1e-5)


def test_auto_picks_the_backend_kernel_and_rejects_unknown_names():
  assert attention.resolve("auto", "gpu") == "cudnn"
  assert attention.resolve("auto", "tpu") == "pallas_flash"
  assert attention.resolve("auto", "cpu") == "xla_chunked"
  assert attention.resolve("dot_product", "tpu") == "dot_product"
  with pytest.raises(ValueError, match="model.attention"):
    attention.resolve("flash3")
  with pytest.raises(ValueError, match="attention"):
    PRESETS["tiny"].replace(attention="flash3")


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_forward_is_the_same_with_every_attention(side, small_chunks):
  """The whole decoder, stand-alone and against a cache, chunked vs reference attention (fp32 <= 1e-5)."""
  cfg = PRESETS["tiny"].text
  params = text.init_params(jax.random.key(5), cfg)
  t = 40
  ids = jax.random.randint(jax.random.key(6), (B, t), 0, 1000)
  _, valid = _padding(t, side)
  mask = valid.astype(jnp.int32)
  pos = jnp.broadcast_to(jnp.cumsum(mask, axis=1) - 1, (3, B, t)).astype(jnp.int32)
  embeds = text.embed_tokens(params, ids)
  run = lambda impl, **kw: text.forward(params, cfg, embeds, pos, attention_mask=mask, attention=impl, **kw)
  seen = np.asarray(valid)
  np.testing.assert_allclose(
      np.asarray(run("xla_chunked")[0])[seen],
      np.asarray(run("reference")[0])[seen], atol=1e-5, rtol=1e-5)
  if side == "right":  # the cache takes right-padded chunks
    cached = {impl: run(impl, cache=text.init_cache(cfg, B, 64)) for impl in ("xla_chunked", "reference")}
    np.testing.assert_allclose(
        np.asarray(cached["xla_chunked"][0])[seen],
        np.asarray(cached["reference"][0])[seen], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(cached["xla_chunked"][1]["k"], cached["reference"][1]["k"], atol=1e-5)


def _dense_segment_attention(q, k, v, segment):
  scores = jnp.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
  scores = jnp.where((segment[:, None] == segment[None, :])[None], scores, -jnp.inf)
  return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(scores, axis=-1), v)


def test_vision_block_attention_matches_dense_segment_masks():
  """Window and full attention of two images plus padding: blocked online softmax == dense masked softmax, values
  and (custom, flash-style) gradients."""
  cfg = PRESETS["3b"].vision
  grids = np.array([[1, 12, 20], [1, 16, 8]])
  padded = 512
  inputs = vision.vision_inputs(grids, cfg, padded, vision.max_key_blocks(16 * 20, cfg))
  block = vision.block_patches(cfg)
  keys = jax.random.split(jax.random.key(7), 3)
  q, k, v = (jax.random.normal(key, (padded, 2, 8)) for key in keys)
  real = inputs["full_segment"] > 0
  weight = jnp.asarray(real, jnp.float32)[:, None, None]
  for segment, key_blocks, chunk in ((inputs["window_segment"], block_attention.window_key_blocks(padded // block), 3),
                                     (inputs["full_segment"], jnp.asarray(inputs["full_key_blocks"]), 4)):
    segment = jnp.asarray(segment)
    attend = block_attention.blocked_attention
    blocked = lambda q, k, v: attend(q, k, v, segment, key_blocks, block, chunk)  # noqa: B023
    dense = lambda q, k, v: _dense_segment_attention(q, k, v, segment)  # noqa: B023
    np.testing.assert_allclose(
        np.asarray(blocked(q, k, v))[real],
        np.asarray(dense(q, k, v))[real], atol=1e-5, rtol=1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(weight * jnp.cos(f(q, k, v)))
    got = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
