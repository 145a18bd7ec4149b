"""GRPO pieces against hand-computed values, and the train step's invariances (micro-batching, masks)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.trainer import step_script
from varft import echo_task, grpo, grpo_loss
from varft.models.qwen25vl import text as text_model


def test_group_advantages_by_hand():
  rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
  groups = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
  # Group 0: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5. Group 1: all equal -> 0.
  std = grpo_loss.group_advantages(rewards, groups, 2, "std")
  np.testing.assert_allclose(std, [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(grpo_loss.group_advantages(rewards, groups, 2, "no_std"),
                             [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], atol=1e-7)
  # Leave-one-out: r_i minus the mean of the other three.
  np.testing.assert_allclose(grpo_loss.group_advantages(rewards, groups, 2, "leave_one_out"),
                             [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0], atol=1e-6)
  # Groups may be interleaved in any order.
  perm = jnp.array([3, 6, 0, 5, 1, 7, 2, 4])
  np.testing.assert_allclose(grpo_loss.group_advantages(rewards[perm], groups[perm], 2, "std"), std[perm], rtol=1e-6)


def test_per_token_loss_clipping_and_k3_by_hand():
  gcfg = grpo.GRPOConfig(beta=0.5, eps_low=0.2, eps_high=0.2)
  logps = jnp.log(jnp.array([[0.5, 0.5, 0.2, 0.5]]))
  old = jnp.log(jnp.array([[0.4, 0.4, 0.4, 0.4]]))
  ref = jnp.log(jnp.array([[0.4, 0.4, 0.4, 0.1]]))
  mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  loss_pos, stats = grpo_loss.per_token_loss(logps, old, jnp.array([1.0]), mask, gcfg, ref)
  loss_neg, stats_neg = grpo_loss.per_token_loss(logps, old, jnp.array([-1.0]), mask, gcfg, ref)
  k3 = lambda p, r: r / p - math.log(r / p) - 1  # exp(ref - logp) - (ref - logp) - 1
  # ratio 1.25 (A=+1): clipped to 1.2; ratio 0.5 (A=+1): unclipped 0.5.
  np.testing.assert_allclose(loss_pos[0, :3],
                             [-1.2 + 0.5 * k3(0.5, 0.4), -1.2 + 0.5 * k3(0.5, 0.4), -0.5 + 0.5 * k3(0.2, 0.4)],
                             rtol=1e-5)
  # A=-1: ratio 1.25 -> min(-1.25, -1.2) = -1.25 (no clip); ratio 0.5 -> min(-0.5, -0.8) = -0.8 (clipped low).
  np.testing.assert_allclose(loss_neg[0, :3],
                             [1.25 + 0.5 * k3(0.5, 0.4), 1.25 + 0.5 * k3(0.5, 0.4), 0.8 + 0.5 * k3(0.2, 0.4)],
                             rtol=1e-5)
  assert float(loss_pos[0, 3]) == 0.0  # off the mask
  np.testing.assert_array_equal(stats["clip_high"][0, :3], [1, 1, 0])
  np.testing.assert_array_equal(stats_neg["clip_low"][0, :3], [0, 0, 1])


def test_off_mask_garbage_cannot_reach_the_loss_or_make_nans():
  gcfg = grpo.GRPOConfig(beta=0.04)
  mask = jnp.array([[0.0, 1.0, 0.0]])
  logps = jnp.array([[-200.0, -1.0, -300.0]])
  old = jnp.array([[0.0, -1.5, 0.0]])
  ref = jnp.array([[-0.1, -1.2, -0.1]])  # exp(ref - logp) would overflow at the masked positions
  loss_fn = lambda lp: jnp.sum(grpo_loss.per_token_loss(lp, old, jnp.array([1.0]), mask, gcfg, ref)[0])
  grads = jax.grad(loss_fn)(logps)
  assert np.all(np.isfinite(grads)) and float(grads[0, 0]) == 0.0 and float(grads[0, 2]) == 0.0


def test_loss_weights_by_hand():
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(grpo_loss.loss_weights(mask, "sequence_mean"), [[0.25, 0.25, 0], [0.5, 0, 0], [0, 0, 0]])
  np.testing.assert_allclose(grpo_loss.loss_weights(mask, "token_mean"), mask / 3)


def test_chunked_logps_and_entropy_equal_full_softmax():
  cfg = echo_task.model_config(vocab_size=64)
  params = {"text": text_model.init_params(jax.random.key(1), cfg.text)}
  batch = {k: jnp.asarray(v) for k, v in step_script.toy_batch().items()}
  logps, entropy = grpo.sequence_logps(params, cfg, batch, None, temperature=0.7, logits_chunk=5)
  embeds = text_model.embed_tokens(params["text"], batch["tokens"])
  hidden, _ = text_model.forward(params["text"], cfg.text, embeds, batch["positions"],
                                 attention_mask=batch["attention_mask"])
  full = jax.nn.log_softmax(text_model.logits(params["text"], cfg.text, hidden) / 0.7)
  expected = jnp.take_along_axis(full[:, :-1], batch["tokens"][:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(logps[:, 1:], expected, atol=1e-5)
  np.testing.assert_array_equal(logps[:, 0], 0.0)
  np.testing.assert_allclose(entropy[:, 1:], -jnp.sum(jnp.exp(full) * full, -1)[:, :-1], atol=1e-4)


_OPTIMIZER = grpo.make_optimizer(1e-2, 10, eps=1e-3)[0]


@functools.cache
def _jitted(gcfg):
  """(logps, train_step) compiled once per config and shared by the tests (compiling dominates their time)."""
  cfg = step_script.MODEL
  return jax.jit(grpo.make_logps_fn(cfg, gcfg)), jax.jit(grpo.make_train_step(cfg, gcfg, _OPTIMIZER))


def _one_update(gcfg, batch_np):
  logps_fn, step_fn = _jitted(gcfg)
  params = {"text": text_model.init_params(jax.random.key(0), step_script.MODEL.text)}
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  adv = grpo_loss.group_advantages(batch["rewards"], batch["group_ids"], step_script.GROUPS)
  prepared = grpo.prepare_batch(batch, adv, batch["sampler_logps"], gcfg, ref_logps=logps_fn(params, batch))
  state, metrics = step_fn(grpo.init_train_state(params, _OPTIMIZER), prepared)
  return state["params"], metrics


def test_micro_batches_accumulate_to_the_full_batch_update():
  batch = step_script.toy_batch()
  full, m1 = _one_update(grpo.GRPOConfig(), batch)
  micro, m4 = _one_update(grpo.GRPOConfig(micro_batches=4), batch)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(micro)):
    np.testing.assert_allclose(a, b, atol=2e-6)
  np.testing.assert_allclose(m1["train/loss"], m4["train/loss"], atol=1e-6)
  np.testing.assert_allclose(m1["train/grad_norm"], m4["train/grad_norm"], rtol=1e-5)


def test_tokens_outside_the_loss_mask_do_not_change_the_update():
  batch = step_script.toy_batch()
  changed = {k: v.copy() for k, v in batch.items()}
  off = (changed["loss_mask"] == 0) & (changed["attention_mask"] == 0)  # padding after the sequence
  changed["tokens"][off] = 5
  changed["sampler_logps"][changed["loss_mask"] == 0] = -50.0
  a, _ = _one_update(grpo.GRPOConfig(), batch)
  b, _ = _one_update(grpo.GRPOConfig(), changed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_importance_correction_uses_trainer_logps_as_old_and_caps_weights():
  gcfg = grpo.GRPOConfig(beta=0.0, tis_cap=2.0)
  batch = {
      "tokens": jnp.zeros((1, 3), jnp.int32),
      "attention_mask": jnp.ones((1, 3), jnp.int32),
      "positions": jnp.zeros((3, 1, 3), jnp.int32),
      "loss_mask": jnp.array([[0.0, 1.0, 1.0]])
  }
  sampler = jnp.array([[0.0, -1.0, -3.0]])
  trainer = jnp.array([[-9.0, -1.5, -1.0]])
  out = grpo.prepare_batch(batch, jnp.array([1.0]), sampler, gcfg, trainer_logps=trainer)
  np.testing.assert_allclose(out["is_weights"], [[0.0, math.exp(-0.5), 2.0]], rtol=1e-6)
  np.testing.assert_allclose(out["old_logps"], [[0.0, -1.5, -1.0]])
  with pytest.raises(ValueError, match="trainer's pre-update log-probs"):
    grpo.prepare_batch(batch, jnp.array([1.0]), sampler, gcfg)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="grpo.advantage 'mean'"):
    grpo.GRPOConfig(advantage="mean")
  with pytest.raises(ValueError, match="optim.schedule"):
    grpo.make_optimizer(1e-3, 10, schedule="step")


def test_a_nonfinite_gradient_skips_the_update():
  optimizer, _ = grpo.make_optimizer(1e-2, 10)
  params = {"w": jnp.ones((3,))}
  state = optimizer.init(params)
  updates, state = optimizer.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  updates, state = optimizer.update({"w": jnp.array([1.0, 1.0, 0.0])}, state, params)
  assert float(jnp.abs(updates["w"]).max()) > 0


def test_warmup_then_cosine_schedule():
  _, lr = grpo.make_optimizer(1.0, 110, warmup_steps=10, schedule="cosine")
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_logits_only_at_loss_positions_equal_logits_everywhere():
  cfg = step_script.MODEL
  params = {"text": text_model.init_params(jax.random.key(2), cfg.text)}
  batch_np = step_script.toy_batch()
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  k = grpo.loss_token_bucket(batch_np["loss_mask"], 1, minimum=8)
  assert k >= batch_np["loss_mask"].sum() and grpo.loss_token_bucket(batch_np["loss_mask"], 4, minimum=8) < k

  def loss(p, num):
    logps, entropy = grpo.sequence_logps(p, cfg, batch, None, logits_chunk=16, num_loss_tokens=num)
    return jnp.sum(logps * batch["loss_mask"]), (logps * batch["loss_mask"], entropy * batch["loss_mask"])

  (full, (lp_full, ent_full)), g_full = jax.value_and_grad(loss, has_aux=True)(params, None)
  (picked, (lp_picked, ent_picked)), g_picked = jax.value_and_grad(loss, has_aux=True)(params, k)
  np.testing.assert_allclose(lp_picked, lp_full, atol=1e-5)
  np.testing.assert_allclose(ent_picked, ent_full, atol=1e-4)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_picked)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Too few slots drop tokens: the bucket really is what decides which positions get logits.
  (short, _), _ = jax.value_and_grad(loss, has_aux=True)(params, 8)
  assert abs(float(short) - float(full)) > 1e-3


def test_vision_gradients_pulled_back_once_equal_direct_gradients():
  """Micro-batches accumulate gradients w.r.t. the image embeddings; one vjp through the vision tower at the end
  must give the gradient of the loss with the tower inside it."""
  import optax

  from varft.models.qwen25vl import model, rope, vision
  cfg = echo_task.model_config(vocab_size=64).replace(image_token_id=5)
  params = model.init_params(jax.random.key(3), cfg)
  rng = np.random.default_rng(0)
  grids = np.array([[1, 4, 4], [1, 4, 8]])  # 4 + 8 merged image tokens
  n, length = 4, 20
  tokens = rng.integers(6, 64, (n, length)).astype(np.int32)
  tokens[0, 2:6] = 5
  tokens[2, 3:11] = 5
  image_index = np.full((n, length), -1, np.int32)
  image_index[0, 2:6] = np.arange(4)
  image_index[2, 3:11] = 4 + np.arange(8)
  positions, _ = rope.sequence_positions(tokens, grids, cfg)
  loss_mask = np.zeros((n, length), np.float32)
  loss_mask[:, 12:] = 1
  pixel_values = rng.normal(size=(vision.num_patches(grids), cfg.vision.patch_dim)).astype(np.float32)
  vision_inputs = vision.vision_inputs(grids, cfg.vision)  # one device: one image table (leading axis 1)
  batch = {
      "tokens": tokens,
      "attention_mask": np.ones((n, length), np.int32),
      "positions": positions,
      "loss_mask": loss_mask,
      "image_index": image_index,
      "pixel_values": pixel_values[None],
      "vision_inputs": {
          k: v[None] for k, v in vision_inputs.items()
      }
  }
  batch = jax.tree.map(jnp.asarray, batch)
  gcfg = grpo.GRPOConfig(beta=0.0, micro_batches=2)
  adv = jnp.array([1.0, -1.0, 0.5, -0.5])
  old = grpo.make_logps_fn(cfg, gcfg)(params, batch) - 0.1 * batch["loss_mask"]
  prepared = grpo.prepare_batch(batch, adv, old, gcfg)
  state, _ = jax.jit(grpo.make_train_step(cfg, gcfg, optax.sgd(1.0)))(grpo.init_train_state(params, optax.sgd(1.0)),
                                                                      prepared)

  def direct_loss(p):
    embeds = grpo.encode_images(p, cfg, batch)
    logps, _ = grpo.sequence_logps(p, cfg, batch, embeds)
    per_token, _ = grpo_loss.per_token_loss(logps, prepared["old_logps"], adv, batch["loss_mask"], gcfg)
    return jnp.sum(per_token * prepared["loss_weights"])

  grads = jax.grad(direct_loss)(params)
  assert float(jnp.abs(grads["vision"]["patch_embed"]["w"]).max()) > 0
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    updated = state["params"]
    for key in path:
      updated = updated[key.key]
    original = params
    for key in path:
      original = original[key.key]
    np.testing.assert_allclose(original - updated, g, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_bf16_compute_keeps_fp32_master_weights():
  batch = step_script.toy_batch()
  _, m32 = _one_update(grpo.GRPOConfig(), batch)
  cfg16 = step_script.MODEL.replace(dtype="bfloat16")
  gcfg = grpo.GRPOConfig()
  params = {"text": text_model.init_params(jax.random.key(0), cfg16.text)}
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  adv = grpo_loss.group_advantages(b["rewards"], b["group_ids"], step_script.GROUPS)
  ref = grpo.make_logps_fn(step_script.MODEL, gcfg)(params, b)
  prepared = grpo.prepare_batch(b, adv, b["sampler_logps"], gcfg, ref_logps=ref)
  state, m16 = jax.jit(grpo.make_train_step(cfg16, gcfg, _OPTIMIZER))(grpo.init_train_state(params, _OPTIMIZER),
                                                                      prepared)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  np.testing.assert_allclose(m16["train/loss"], m32["train/loss"], atol=2e-2)
  np.testing.assert_allclose(m16["train/grad_norm"], m32["train/grad_norm"], rtol=5e-2)
