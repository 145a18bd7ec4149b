"""GRPO: the step's loss settings, sequence log-probs, the optimizer and the jitted, sharded train step.

Conventions (the batch of `varft.batch`): `logps[:, t]` is the log-probability of `tokens[:, t]` predicted
from position `t - 1`; `logps[:, 0]` is 0. `loss_mask[:, t]` is 1 only where the policy sampled `tokens[:, t]`, so
prompt, tool-output and padding tokens never carry loss. The advantages, per-token losses and aggregations (tables by
name) are `varft.grpo_loss`; `apply_gradients` is the one update under the GRPO and the SFT steps.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varft import batch as batch_lib
from varft import sampling, sharding
from varft.grpo_loss import ADVANTAGE_MODES, AGGREGATION_MODES, POLICY_LOSSES, loss_weights, per_token_loss
from varft.models.qwen25vl import model
from varft.models.qwen25vl import text as text_model
from varft.models.qwen25vl.config import Qwen25VLConfig

Params = dict[str, Any]
Batch = dict[str, Any]
TrainState = dict[str, Any]  # params, opt_state, step


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Static loss hyperparameters (hashable: part of the jitted step's closure)."""
  beta: float = 0.04
  eps_low: float = 0.2
  eps_high: float = 0.2
  advantage: str = "std"
  aggregation: str = "sequence_mean"
  policy_loss: str = "clipped"  # clipped (PPO-style surrogate) | reinforce (the released trainers' ratio == 1)
  tis_cap: float = 0.0  # > 0: truncated importance weights between the sampler and the trainer
  temperature: float = 1.0  # the sampling temperature: log-probs are taken of logits / temperature
  micro_batches: int = 1
  logits_chunk: int = 256  # sequence positions per chunk of vocabulary logits
  train_vision: bool = True

  def __post_init__(self):
    if self.advantage not in ADVANTAGE_MODES:
      raise ValueError(f"grpo.advantage {self.advantage!r} is not one of {ADVANTAGE_MODES}")
    if self.aggregation not in AGGREGATION_MODES:
      raise ValueError(f"grpo.aggregation {self.aggregation!r} is not one of {AGGREGATION_MODES}")
    if self.policy_loss not in POLICY_LOSSES:
      raise ValueError(f"grpo.policy_loss {self.policy_loss!r} is not one of {tuple(POLICY_LOSSES)}")
    if self.micro_batches < 1 or self.logits_chunk < 1:
      raise ValueError("grpo.micro_batches and grpo.logits_chunk must be >= 1")
    if not (0 <= self.eps_low < 1 and self.eps_high >= 0 and self.beta >= 0 and self.temperature > 0):
      raise ValueError(f"grpo: need 0 <= eps_low < 1, eps_high >= 0, beta >= 0, temperature > 0; got {self}")


# --------------------------------------------------------------------------------------------------- log-probs


def _chunked_logps(text_params: Params, text_cfg, hidden: jnp.ndarray, targets: jnp.ndarray, temperature: float,
                   chunk: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Log-probs and entropies of `targets` (N, T) under the logits of `hidden` (N, T, D), `chunk` positions at a
  time, so that (N, T, V) logits never exist at once (also not in the backward pass: each chunk is rematerialised).

  On a mesh the logits are vocabulary-parallel: the chunk's hidden states (rows x chunk x D, the loss slots only)
  are gathered over the fsdp axis and each device computes its slice of the vocabulary against its slice of the
  output matrix, so the full (V, D) matrix and its gradient never exist on one device (only row statistics are
  all-reduced).
  """
  head = "embed" if text_cfg.tie_word_embeddings else "lm_head"
  head_axes = ("loss_vocab", None) if text_cfg.tie_word_embeddings else (None, "loss_vocab")
  text_params = {head: sharding.constrain(text_params[head], head_axes)}
  n, length, d = hidden.shape
  chunk = min(chunk, length)
  padded = -(-length // chunk) * chunk
  hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, padded - length)))
  hidden = hidden.reshape(n, padded // chunk, chunk, d).swapaxes(0, 1)
  targets = targets.reshape(n, padded // chunk, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(h, t):
    h = sharding.constrain(h, ("loss_batch", "length", "act_embed"))
    logits = text_model.logits(text_params, text_cfg, h) / temperature  # (N, C, V) float32
    logits = sharding.constrain(logits, ("loss_batch", "length", "loss_vocab"))
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    # The target's logit by a masked sum (a reduction over the sharded vocabulary), not a gather.
    is_target = jnp.arange(logits.shape[-1], dtype=t.dtype) == t[..., None]
    logp = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1) - log_norm
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    entropy = jax.lax.stop_gradient(log_norm) - jnp.sum(probs * jax.lax.stop_gradient(logits), axis=-1)
    return logp, entropy

  _, (logps, entropy) = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None, (hidden, targets))
  rows = lambda x: sharding.constrain(x.swapaxes(0, 1).reshape(n, padded)[:, :length], ("batch", "length"))
  return rows(logps), rows(entropy)


def compute_params(params: Params, config: Qwen25VLConfig) -> Params:
  """The parameters cast to the compute dtype, shard by shard in their own layout: the layers then all-gather
  compute-dtype weights (half the traffic of float32 master weights with bf16 compute). Numerically a no-op: every
  weight is cast to the compute dtype where it is used anyway."""
  dtype = jnp.dtype(config.dtype)
  cast = jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
  return sharding.constrain_params(cast)


def encode_images(params: Params, config: Qwen25VLConfig, batch: Batch) -> jnp.ndarray | None:
  """The merged image embeddings (D, M, E) of each device's image table, or None for a text-only batch."""
  if not batch_lib.num_tables(batch):
    return None
  return batch_lib.encode_tables(lambda pv, vi: model.encode_images(params, config, pv, vi), batch["pixel_values"],
                                 batch["vision_inputs"])


# The static logit-slot counts a step compiles for: powers of two, so a run compiles a few programs at most.
def loss_token_bucket(loss_mask, micro_batches: int = 1, minimum: int = 64) -> int:
  """A static count >= the loss tokens of any micro-batch (a power of two): the positions that get logits.

  Host-side (numpy). Micro-batch i holds rows i, i + m, ... (see `make_train_step`).
  """
  mask = np.asarray(loss_mask) > 0
  per_micro = max(int(mask[i::micro_batches].sum()) for i in range(micro_batches))
  return sampling.power_of_two_bucket(per_micro, minimum)


def row_loss_token_bucket(loss_mask, minimum: int = 16) -> int:
  """A static count >= the loss tokens of any row (a power of two): the per-row slots that get logits.

  Host-side (numpy); all hosts must agree on it (take the max over hosts).
  """
  per_row = int((np.asarray(loss_mask) > 0).sum(axis=1).max(initial=0))
  return sampling.power_of_two_bucket(per_row, minimum)


def turn_loss_slots(max_new_tokens: int) -> int:
  """The per-row logit slots of one whole turn (`row_loss_token_bucket` of `max_new_tokens` loss tokens): GRPO's
  floor, what the planner plans for."""
  return row_loss_token_bucket(np.ones((1, max_new_tokens)))


def loss_slots(loss_mask, minimum: int = 0) -> int:
  """Per-row logit slots of a batch (`row_loss_token_bucket`, agreed by all hosts), at least `minimum`. GRPO passes
  the bucket of `rollout.max_new_tokens` (what the planner plans for), so its update compiles once instead of once
  per power of two its batches happen to need; the SFT warm-up passes none (its references' loss tokens vary 5x
  over hundreds of updates, and its few buckets compile once each)."""
  return max(minimum, *sharding.gather_json(row_loss_token_bucket(loss_mask)))


def sequence_logps(params: Params, config: Qwen25VLConfig, batch: Batch, image_embeds: jnp.ndarray | None,
                   temperature: float = 1.0, logits_chunk: int = 256, num_loss_tokens: int | None = None,
                   row_loss_tokens: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-token log-probs and entropies (N, L) of `batch['tokens']` under the policy; column 0 is 0.

  Vocabulary logits are computed only at the loss-mask positions, every other position gets 0 (prompts and tool
  outputs are most of a sequence, and the vocabulary projection dominates the cost of small models): with
  `row_loss_tokens` (static, >= the loss tokens of any row, see `row_loss_token_bucket`) each row gathers its own
  positions, so rows stay on their device; with `num_loss_tokens` (static, >= the loss tokens of the whole batch)
  the positions of all rows are gathered into one list. Neither: logits at every position.
  """
  tokens = batch["tokens"]
  embeds = model.embed(params, config, tokens, image_embeds, batch.get("image_index"))
  hidden, _ = text_model.forward(params["text"], config.text, embeds, batch["positions"],
                                 attention_mask=batch["attention_mask"], dtype=jnp.dtype(config.dtype),
                                 remat=config.remat, attention=config.attention)
  hidden = sharding.constrain(hidden[:, :-1], ("batch", "length", "act_embed"))
  targets = tokens[:, 1:]
  n, length, d = hidden.shape
  selected = batch["loss_mask"][:, 1:] > 0
  if row_loss_tokens is not None:
    slots = min(row_loss_tokens, length)
    index = jax.vmap(lambda row: jnp.nonzero(row, size=slots, fill_value=length)[0])(selected)  # (N, slots)
    picked_hidden = jnp.take_along_axis(hidden, index[..., None], axis=1, mode="fill", fill_value=0)
    picked_targets = jnp.take_along_axis(targets, index, axis=1, mode="fill", fill_value=0)
    picked = _chunked_logps(params["text"], config.text, picked_hidden, picked_targets, temperature, logits_chunk)
    # Per row (vmapped): the scatter keeps the batch dimension, so each device writes only its own rows.
    scatter = jax.vmap(lambda i, v: jnp.zeros((length,), v.dtype).at[i].set(v, mode="drop"))
    scatter = functools.partial(scatter, index)
    logps, entropy = scatter(picked[0]), scatter(picked[1])
  elif num_loss_tokens is not None:
    index = jnp.nonzero(selected.reshape(-1), size=num_loss_tokens, fill_value=n * length)[0]
    picked_hidden = jnp.take(hidden.reshape(-1, d), index, axis=0, mode="fill", fill_value=0)
    picked_targets = jnp.take(targets.reshape(-1), index, axis=0, mode="fill", fill_value=0)
    picked = _chunked_logps(params["text"], config.text, picked_hidden[None], picked_targets[None], temperature,
                            logits_chunk)
    scatter = lambda v: jnp.zeros((n * length,), v.dtype).at[index].set(v[0], mode="drop").reshape(n, length)
    logps, entropy = scatter(picked[0]), scatter(picked[1])
  else:
    logps, entropy = _chunked_logps(params["text"], config.text, hidden, targets, temperature, logits_chunk)
  zero = jnp.zeros_like(logps[:, :1])
  return jnp.concatenate([zero, logps], axis=1), jnp.concatenate([zero, entropy], axis=1)


def make_logps_fn(config: Qwen25VLConfig, gcfg: GRPOConfig, mesh=None) -> Callable[..., jnp.ndarray]:
  """`logps(params, batch, num_loss_tokens=None, row_loss_tokens=None) -> (N, L)`: the reference policy's (or the
  pre-update trainer's) token log-probs (jit with those two as `static_argnames`). On `mesh`, activations carry
  their logical shardings (see `sharding.constrain`).

  With per-row slots (`row_loss_tokens`) the rows go through in `gcfg.micro_batches` micro-batches, as in the train
  step, so activations and logits of only one micro-batch are live at a time."""

  def logps_fn(params, batch, num_loss_tokens=None, row_loss_tokens=None):
    with sharding.tracing_mesh(mesh):
      params = compute_params(params, config)
      image_embeds = encode_images(params, config, batch)
      run = lambda mb: sequence_logps(params, config, _constrain_rows(mb), image_embeds, gcfg.temperature, gcfg.
                                      logits_chunk, num_loss_tokens, row_loss_tokens)[0]
      m, n = gcfg.micro_batches, batch["tokens"].shape[0]
      if m == 1 or row_loss_tokens is None or n % m:
        return run(batch)
      _, logps = jax.lax.scan(lambda c, mb: (c, run(mb)), None, _split_micro(batch, m))
      return jnp.moveaxis(logps, 0, 1).reshape(n, -1)  # micro-batch i holds rows i, i + m, ...

  return logps_fn


def _constrain_rows(batch: Batch) -> Batch:
  """Row entries of a (micro-)batch kept row-sharded; `positions` (3, N, L) on axis 1."""
  out = dict(batch)
  for k, v in batch.items():
    if k == "positions":
      out[k] = sharding.constrain(v, (None, "batch", "length"))
    elif k in batch_lib.ROW_KEYS:
      out[k] = sharding.constrain(v, ("batch",) + (None,) * (v.ndim - 1))
  return out


# --------------------------------------------------------------------------------------------------- the step


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   end_ratio: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, max_grad_norm: float = 1.0) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW after global-norm clipping, with a linear warm-up into a cosine / linear / constant schedule.

  Returns the optimizer and its learning-rate schedule (for logging).
  """
  decay_steps = max(total_steps - warmup_steps, 1)
  end_value = learning_rate * end_ratio
  if schedule == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_ratio)
  elif schedule == "linear":
    after = optax.linear_schedule(learning_rate, end_value, decay_steps)
  elif schedule == "constant":
    after = optax.constant_schedule(learning_rate)
  else:
    raise ValueError(f"optim.schedule {schedule!r} is not one of cosine, linear, constant")
  lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps]) \
      if warmup_steps > 0 else after
  chain = []
  if max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(max_grad_norm))
  chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  # A non-finite gradient (one pathological batch) skips its update instead of poisoning the weights; only a
  # long streak of them (a diverged run) goes through and shows up as NaN params.
  return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=20), lr


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
  return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def prepare_batch(batch: Batch, advantages: jnp.ndarray, old_logps: jnp.ndarray, gcfg: GRPOConfig,
                  ref_logps: jnp.ndarray | None = None, trainer_logps: jnp.ndarray | None = None) -> Batch:
  """The rollout batch plus what the step needs: advantages, old/reference log-probs, weights.

  `old_logps` are the sampler's log-probs. With `gcfg.tis_cap > 0`, `trainer_logps` (the trainer's log-probs before
  the update) become the old log-probs of the ratio and min(exp(trainer - sampler), tis_cap) weights each token.
  """
  out = {k: batch[k] for k in batch_lib.MODEL_INPUTS if k in batch and batch[k] is not None}
  mask = out["loss_mask"].astype(jnp.float32)
  out["advantages"] = jnp.asarray(advantages, jnp.float32)
  out["loss_weights"] = loss_weights(mask, gcfg.aggregation)
  if gcfg.tis_cap > 0:
    if trainer_logps is None:
      raise ValueError("grpo.tis_cap > 0 needs the trainer's pre-update log-probs")
    out["is_weights"] = jnp.minimum(jnp.exp((trainer_logps - old_logps) * mask), gcfg.tis_cap) * mask
    old_logps = trainer_logps
  out["old_logps"] = jnp.asarray(old_logps, jnp.float32) * mask
  if gcfg.beta > 0:
    if ref_logps is None:
      raise ValueError("grpo.beta > 0 needs the reference policy's log-probs")
    out["ref_logps"] = jnp.asarray(ref_logps, jnp.float32)
  return out


_split_micro = batch_lib.split_micro


def apply_gradients(state: TrainState, batch: Batch, loss_fn: Callable[..., tuple[jnp.ndarray, dict]],
                    config: Qwen25VLConfig, optimizer: optax.GradientTransformation, micro_batches: int = 1,
                    train_vision: bool = True) -> tuple[TrainState, jnp.ndarray, dict, Params]:
  """One optimizer update of `state` from `loss_fn(params, image_embeds, micro_batch) -> (loss, sums)` (the GRPO
  and the SFT step): (the new state, the loss and the sums over the micro-batches, the gradients).

  Each device encodes its image table once (`encode_images`); the micro-batches (`batch.split_micro`) accumulate, in
  float32, gradients w.r.t. the parameters and the image embeddings, which are pulled back through the vision tower
  once at the end (without `train_vision` the tower gets no gradient).
  """
  params = state["params"]
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  image_embeds = vision_vjp = None
  if batch_lib.num_tables(batch):
    encode = lambda p: encode_images(compute_params(p, config), config, batch)
    if train_vision:
      image_embeds, vision_vjp = jax.vjp(encode, params)
    else:
      image_embeds = jax.lax.stop_gradient(encode(params))
  if micro_batches == 1:
    (loss, sums), (grads, embed_grads) = grad_fn(params, image_embeds, batch)
  else:
    micro = _split_micro(batch, micro_batches)

    def accumulate(carry, mb):
      (loss, sums), g = grad_fn(params, image_embeds, mb)
      return jax.tree.map(lambda a, b: a + b.astype(a.dtype), carry, (loss, sums, g)), None

    shapes = jax.eval_shape(lambda: grad_fn(params, image_embeds, jax.tree.map(lambda x: x[0], micro)))
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, sums, (grads, embed_grads)), _ = jax.lax.scan(accumulate, init, micro)
  if vision_vjp is not None:
    (vision_grads,) = vision_vjp(embed_grads.astype(image_embeds.dtype))
    grads = jax.tree.map(jnp.add, grads, vision_grads)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  updates, opt_state = optimizer.update(grads, state["opt_state"], params)
  new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
  return new_state, loss, sums, grads


def make_train_step(config: Qwen25VLConfig, gcfg: GRPOConfig, optimizer: optax.GradientTransformation,
                    mesh=None) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jnp.ndarray]]]:
  """`train_step(state, batch, num_loss_tokens=None, row_loss_tokens=None) -> (state, metrics)` for a batch from
  `prepare_batch`.

  Jit it with shardings and `static_argnames=('num_loss_tokens', 'row_loss_tokens')` (per micro-batch, see
  `loss_token_bucket`, or per row, see `row_loss_token_bucket`; None: logits at every position). On `mesh` the
  activations carry their logical shardings (rows stay on their device) and the weights are gathered in the
  compute dtype.
  """

  def micro_loss(params, image_embeds, mb, num_loss_tokens, row_loss_tokens):
    mb = _constrain_rows(mb)
    logps, entropy = sequence_logps(compute_params(params, config), config, mb, image_embeds, gcfg.temperature,
                                    gcfg.logits_chunk, num_loss_tokens, row_loss_tokens)
    per_token, stats = per_token_loss(logps, mb["old_logps"], mb["advantages"], mb["loss_mask"], gcfg,
                                      mb.get("ref_logps"), mb.get("is_weights"))
    mask = mb["loss_mask"].astype(jnp.float32)
    sums = {k: jnp.sum(v * mask) for k, v in stats.items()}
    sums["entropy"] = jnp.sum(entropy * mask)
    sums["tokens"] = jnp.sum(mask)
    return jnp.sum(per_token * mb["loss_weights"]), sums

  def train_step(state, batch, num_loss_tokens=None, row_loss_tokens=None):
    with sharding.tracing_mesh(mesh):
      loss_fn = lambda p, e, mb: micro_loss(p, e, mb, num_loss_tokens, row_loss_tokens)
      new_state, loss, sums, grads = apply_gradients(state, batch, loss_fn, config, optimizer, gcfg.micro_batches,
                                                     gcfg.train_vision)
    tokens = jnp.maximum(sums.pop("tokens"), 1.0)
    metrics = {f"train/{k}": v / tokens for k, v in sums.items()}
    metrics["train/clip_fraction"] = metrics["train/clip_low"] + metrics["train/clip_high"]
    metrics.update({
        "train/loss": loss,
        "train/grad_norm": optax.global_norm(grads),
        "train/nonfinite_grads": 1.0 - jnp.isfinite(optax.global_norm(grads)).astype(jnp.float32),
        "train/param_norm": optax.global_norm(new_state["params"]),
        "train/loss_tokens": tokens
    })
    return new_state, metrics

  return train_step
