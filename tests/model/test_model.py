"""Whole-model behaviour without a peer: bf16 vs fp32, compile caching, host index arrays, input checks, remat."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varft.models import qwen25vl
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model, vision

IMAGE = config_lib.IMAGE_TOKEN_ID


@pytest.fixture(scope="module")
def random_model():
  """The tiny preset with a 1,024-token vocabulary (image token 1000): fast to initialise and to compile."""
  tiny = config_lib.get_config("tiny")
  config = tiny.replace(text=dataclasses.replace(tiny.text, vocab_size=1024), image_token_id=1000)
  return config, model.init_params(jax.random.key(0), config)


def _sequence(rng, grids, text_len=12, image_token=IMAGE):
  """Token ids with one run of image tokens per image, text between them, and random patches."""
  ids = [rng.integers(0, 1000, text_len)]
  for t, h, w in grids:
    ids += [np.full(t * h * w // 4, image_token), rng.integers(0, 1000, 3)]
  patches = rng.standard_normal((int(np.prod(grids, axis=1).sum()), 1176)).astype(np.float32)
  return np.concatenate(ids)[None], patches


def test_bf16_close_to_fp32(random_model):
  config32, params = random_model
  params32 = jax.tree.map(lambda x: 3.0 * x, params)  # std 0.06 weights: activations of a realistic size
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  config16 = config32.replace(dtype="bfloat16")
  grids = np.array([[1, 16, 12]])
  ids, patches = _sequence(np.random.default_rng(0), grids, image_token=config32.image_token_id)
  full = np.asarray(qwen25vl.apply(params32, config32, ids, None, patches, grids))
  half = np.asarray(qwen25vl.apply(params16, config16, ids, None, patches, grids))
  assert half.dtype == np.float32
  assert np.abs(full - half).max() <= 0.02 * np.abs(full).max() + 0.02

  def probs(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  assert 0.5 * np.abs(probs(full) - probs(half)).sum(-1).max() < 0.03  # total variation per position


def test_no_recompilation_for_the_same_buckets(random_model):
  config, params = random_model
  rng = np.random.default_rng(1)
  bucket = 512
  # Different images (different grids, even a different number of images), same token length and patch bucket.
  first = [np.array([[1, 16, 16]])]
  second = [np.array([[1, 8, 12], [1, 6, 20], [1, 4, 4]])]
  ids1, patches1 = _sequence(rng, first[0], text_len=40, image_token=config.image_token_id)
  ids2, patches2 = _sequence(rng, second[0], text_len=40 + 64 - 24 - 30 - 4 - 6, image_token=config.image_token_id)
  assert ids1.shape == ids2.shape
  model.apply(params, config, ids1, None, patches1, first[0], num_patches_padded=bucket)
  compiled = model._apply_jit._cache_size()
  model.apply(params, config, ids2, None, patches2, second[0], num_patches_padded=bucket)
  assert model._apply_jit._cache_size() == compiled


def test_window_index_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index
  cfg = config_lib.get_config("3b").vision
  grids = np.array([[1, 18, 14], [1, 16, 32], [2, 4, 6], [1, 2, 2]])
  inputs = vision.vision_inputs(grids, cfg)
  order, cu_windows = get_vision_window_index(torch.from_numpy(grids), 2, 112, 14)
  np.testing.assert_array_equal(inputs["window_order"], order.numpy())
  np.testing.assert_array_equal(inputs["window_order"][inputs["window_inverse"]], np.arange(len(order)))
  # Window segments change exactly at transformers' cumulative window boundaries.
  boundaries = np.flatnonzero(np.diff(inputs["window_segment"])) + 1
  np.testing.assert_array_equal(np.r_[0, boundaries, len(inputs["window_segment"])], cu_windows.numpy())
  frames = np.r_[0, np.flatnonzero(np.diff(inputs["full_segment"])) + 1, len(inputs["full_segment"])]
  np.testing.assert_array_equal(frames, get_vision_cu_seqlens(torch.from_numpy(grids)).numpy())
  positions = get_vision_position_ids(torch.from_numpy(grids), 2).numpy()
  windowed = positions.reshape(-1, 4, 2)[order.numpy()].reshape(-1, 2)
  np.testing.assert_array_equal(inputs["rotary_ids"], windowed)


def test_vision_inputs_padding_and_errors():
  cfg = config_lib.get_config("tiny").vision
  grids = np.array([[1, 4, 6]])
  inputs = vision.vision_inputs(grids, cfg, num_patches_padded=40)
  assert inputs["window_order"].shape == (10,) and inputs["window_segment"].shape == (40,)
  np.testing.assert_array_equal(inputs["window_order"][6:], np.arange(6, 10))
  assert (inputs["window_segment"][24:] == 0).all() and (inputs["window_segment"][:24] >= 1).all()
  assert (inputs["full_segment"][24:] == 0).all()
  with pytest.raises(ValueError, match="multiple of 4"):
    vision.vision_inputs(grids, cfg, num_patches_padded=26)
  with pytest.raises(ValueError, match="at least"):
    vision.vision_inputs(grids, cfg, num_patches_padded=20)
  with pytest.raises(ValueError, match="not a multiple of 2"):
    vision.vision_inputs(np.array([[1, 3, 4]]), cfg)


def test_full_attention_key_blocks_cover_each_image_and_bound_holds():
  cfg = config_lib.get_config("tiny").vision  # blocks of 64 patches
  grids = np.array([[1, 8, 12], [1, 4, 4], [1, 20, 8], [1, 2, 2]])  # 96, 16, 160, 4 patches
  tight = vision.vision_inputs(grids, cfg)
  blocks = tight["full_key_blocks"]
  segment = tight["full_segment"]
  nb = blocks.shape[0]
  for b in range(nb):
    visited = set(blocks[b][blocks[b] < nb].tolist())
    for s in set(segment[b * 64:(b + 1) * 64].tolist()) - {0}:
      assert set((np.flatnonzero(segment == s) // 64).tolist()) <= visited
  assert blocks.shape[1] == 5  # block 1 holds the end of image 1 (from block 0), image 2 and image 3 (to block 4)
  bound = vision.max_key_blocks(160, cfg)
  assert vision.vision_inputs(grids, cfg, num_key_blocks=bound)["full_key_blocks"].shape == (nb, bound)
  with pytest.raises(ValueError, match="num_key_blocks=4 is too small"):
    vision.vision_inputs(grids, cfg, num_key_blocks=4)


def test_tight_and_dense_key_blocks_agree(random_model):
  config, params = random_model
  grids = np.array([[1, 8, 12], [1, 4, 4], [1, 20, 8]])
  patches = np.random.default_rng(4).standard_normal((272, 1176)).astype(np.float32)
  tight = model.encode_images(params, config, patches, vision.vision_inputs(grids, config.vision))
  dense = model.encode_images(params, config, patches, vision.vision_inputs(grids, config.vision, 272, 5))
  np.testing.assert_allclose(tight, dense, atol=1e-5)


def test_image_tokens_take_image_embeddings_in_order(random_model):
  config, params = random_model
  image = config.image_token_id
  ids = np.array([[5, image, image, 7], [image, 9, 9, 0]])
  index = model.image_index_for(ids, config)
  np.testing.assert_array_equal(index, [[-1, 0, 1, -1], [2, -1, -1, -1]])
  table = jnp.arange(3 * 64, dtype=jnp.float32).reshape(3, 64)
  embeds = model.embed(params, config, jnp.asarray(ids), table, jnp.asarray(index))
  np.testing.assert_array_equal(embeds[1, 0], table[2])
  np.testing.assert_array_equal(embeds[0, 0], params["text"]["embed"][5])


def test_per_device_image_tables_feed_their_own_rows(random_model):
  config, params = random_model
  image = config.image_token_id
  ids = np.array([[image, 5], [image, image], [7, image], [image, 9]])  # rows 0-1 on table 0, rows 2-3 on table 1
  index = np.array([[0, -1], [1, 2], [-1, 0], [1, -1]], np.int32)
  tables = jnp.arange(2 * 3 * 64, dtype=jnp.float32).reshape(2, 3, 64)
  embeds = model.embed(params, config, jnp.asarray(ids), tables, jnp.asarray(index))
  np.testing.assert_array_equal(embeds[1, 1], tables[0, 2])
  np.testing.assert_array_equal(embeds[2, 1], tables[1, 0])
  np.testing.assert_array_equal(embeds[3, 0], tables[1, 1])
  np.testing.assert_array_equal(embeds[2, 0], params["text"]["embed"][7])


def test_input_mismatches_are_rejected(random_model):
  config, _ = random_model
  grids = np.array([[1, 4, 4]])
  ids, patches = _sequence(np.random.default_rng(2), grids, image_token=config.image_token_id)
  with pytest.raises(ValueError, match="image tokens"):
    model.prepare_inputs(config, ids[:, 1:-4], None, patches, grids)
  with pytest.raises(ValueError, match="patches"):
    model.prepare_inputs(config, ids, None, patches[:8], grids)
  with pytest.raises(ValueError, match="together"):
    model.prepare_inputs(config, ids, None, patches, None)


def test_remat_switch_rematerialises_the_vision_blocks(random_model):
  config, params = random_model
  grids = np.array([[1, 4, 4]])
  patches = np.zeros((16, 1176), np.float32)
  inputs = vision.vision_inputs(grids, config.vision)

  def grad_jaxpr(remat):
    loss = lambda p: vision.forward(p, config.vision, patches, inputs, remat=remat).sum()
    return str(jax.make_jaxpr(jax.grad(loss))(params["vision"]))

  assert "remat" in grad_jaxpr(True) or "checkpoint" in grad_jaxpr(True)
  assert "remat" not in grad_jaxpr(False) and "checkpoint" not in grad_jaxpr(False)
