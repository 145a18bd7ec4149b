"""Supervised warm-up: teacher-forced cross-entropy on reference trajectories, and its jitted, sharded step.

The batch is the training-batch schema of `varft.batch` (rows over the mesh's batch axes, each device's images in
its own table), built from reference steps by `varft.sft_data`. `loss_mask[:, t]` is 1 only where `tokens[:, t]` is
an assistant token of the reference, so the prompt, the tool outputs, the image tokens and the padding never carry
loss; the loss keeps image and padding positions out even when a mask says otherwise (they are not text the model
could be taught to write).

The step shares everything else with GRPO (`varft.grpo`): the train state and optimizer, the weights gathered in
the compute dtype, each device encoding its own image table once (its gradient pulled back through the vision
tower once), logits only at each row's loss slots (`row_loss_tokens`), micro-batches by `batch.split_micro`, the
activations' logical shardings on the mesh. Cold-start SFT before RL is the usual recipe for tool use, so this
runs at 3b / 7b on the same meshes as GRPO.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax.numpy as jnp
import optax

from varft import batch as batch_lib
from varft import grpo, grpo_loss, sharding
from varft.models.qwen25vl.config import Qwen25VLConfig

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Static settings of the supervised step (hashable: part of the jitted step's closure)."""
  aggregation: str = "token_mean"  # token_mean | sequence_mean (as grpo_loss.loss_weights)
  micro_batches: int = 1
  logits_chunk: int = 256
  train_vision: bool = True

  def __post_init__(self):
    if self.aggregation not in grpo_loss.AGGREGATION_MODES:
      raise ValueError(f"sft.aggregation {self.aggregation!r} is not one of {grpo_loss.AGGREGATION_MODES}")
    if self.micro_batches < 1 or self.logits_chunk < 1:
      raise ValueError("sft.micro_batches and sft.logits_chunk must be >= 1")


def effective_loss_mask(batch: Batch) -> jnp.ndarray:
  """(N, L) float: the reference's assistant tokens; never padding or image tokens, whatever `loss_mask` says."""
  mask = batch["loss_mask"].astype(jnp.float32) * (batch["attention_mask"] > 0)
  if batch.get("image_index") is not None:
    mask = mask * (batch["image_index"] < 0)
  return mask


def prepare_batch(batch: Batch, scfg: SFTConfig) -> Batch:
  """The step's inputs: the batch's model inputs (`batch.MODEL_INPUTS`), the effective loss mask and the
  aggregation weights (`loss_weights`, a `batch.TRAIN_FIELDS` field)."""
  out = {k: batch[k] for k in batch_lib.MODEL_INPUTS if k in batch and batch[k] is not None}
  out["loss_mask"] = effective_loss_mask(batch)
  out["loss_weights"] = grpo_loss.loss_weights(out["loss_mask"], scfg.aggregation)
  return out


def per_token_nll(logps: jnp.ndarray, loss_mask: jnp.ndarray) -> jnp.ndarray:
  """(N, L) negative log-likelihood of the masked tokens, exactly 0 elsewhere."""
  return jnp.where(loss_mask > 0, -logps, 0.0)


def make_sft_step(config: Qwen25VLConfig, scfg: SFTConfig, optimizer: optax.GradientTransformation,
                  mesh=None) -> Callable[..., tuple[dict[str, Any], dict[str, jnp.ndarray]]]:
  """`sft_step(state, batch, row_loss_tokens=None) -> (state, metrics)` for a batch from `prepare_batch`.

  `state` is `grpo.init_train_state`'s. Jit it with the train state's shardings, `donate_argnums=0` and
  `static_argnames='row_loss_tokens'` (see `grpo.row_loss_token_bucket`; None: logits at every position). On
  `mesh` the activations carry their logical shardings, as in `grpo.make_train_step`.
  """

  def micro_loss(params, image_embeds, mb, row_loss_tokens):
    mb = grpo._constrain_rows(mb)
    logps, entropy = grpo.sequence_logps(grpo.compute_params(params, config), config, mb, image_embeds, 1.0,
                                         scfg.logits_chunk, row_loss_tokens=row_loss_tokens)
    mask = mb["loss_mask"]
    nll = per_token_nll(logps, mask)
    sums = {
        "nll": jnp.sum(nll),
        "entropy": jnp.sum(entropy * mask),
        "tokens": jnp.sum(mask),
        "prob": jnp.sum(jnp.where(mask > 0, jnp.exp(logps), 0.0))
    }
    return jnp.sum(nll * mb["loss_weights"]), sums

  def sft_step(state, batch, row_loss_tokens=None):
    with sharding.tracing_mesh(mesh):
      loss_fn = lambda p, e, mb: micro_loss(p, e, mb, row_loss_tokens)
      new_state, loss, sums, grads = grpo.apply_gradients(state, batch, loss_fn, config, optimizer, scfg.micro_batches,
                                                          scfg.train_vision)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grad_norm = optax.global_norm(grads)
    metrics = {
        "sft/loss": loss,
        "sft/nll_per_token": sums["nll"] / tokens,
        "sft/token_prob": sums["prob"] / tokens,
        "train/entropy": sums["entropy"] / tokens,
        "train/grad_norm": grad_norm,
        "train/nonfinite_grads": 1.0 - jnp.isfinite(grad_norm).astype(jnp.float32),
        "train/param_norm": optax.global_norm(new_state["params"]),
        "train/loss_tokens": sums["tokens"]
    }
    return new_state, metrics

  return sft_step
