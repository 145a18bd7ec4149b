"""The GRPO loss: group-relative advantages, per-token policy losses (clipped surrogate or REINFORCE) with a k3 KL
penalty, and the aggregation of tokens into the batch loss; each a table by name (`grpo.advantage`,
`grpo.policy_loss`, `grpo.aggregation` / `sft.aggregation`). Pure functions over arrays: `varft.grpo` builds the
step around them.

Conventions (the batch of `varft.batch`): `logps[:, t]` is the log-probability of `tokens[:, t]` predicted
from position `t - 1`; `logps[:, 0]` is 0. `loss_mask[:, t]` is 1 only where the policy sampled `tokens[:, t]`, so
prompt, tool-output and padding tokens never carry loss.

The loss of one token is

    -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * k3(ref, logp),   r = exp(logp - logp_old)

or, with `policy_loss='reinforce'` (the released Visual-ARFT trainers), -exp(logp - stop_gradient(logp)) * A
+ beta * k3: the ratio is 1 in value and its gradient is that of logp, so the update is REINFORCE with the group
baseline (what the clipped surrogate also is at mu = 1 when the sampler's and the trainer's log-probs agree exactly),
never clipped.

Either is optionally times a truncated importance weight min(exp(logp_old - logp_sampler), tis_cap) that corrects for
the sampler and the trainer computing slightly different probabilities. Tokens are aggregated either per sequence
(token mean within a sequence, then mean over sequences, as the paper's trainer) or by one global token mean. The
aggregation is turned into per-token weights over the whole batch first, so accumulating gradients over micro-batches
gives exactly the full-batch gradient.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from varft.grpo import GRPOConfig

# --------------------------------------------------------------------------------------------------- advantages


def _std_advantages(rewards, mean, n, group_ids, num_groups, eps):
  sq = jax.ops.segment_sum((rewards - mean) ** 2, group_ids, num_groups)[group_ids]
  std = jnp.sqrt(sq / jnp.maximum(n - 1.0, 1.0))
  return (rewards - mean) / (std + eps)


def _mean_advantages(rewards, mean, n, group_ids, num_groups, eps):
  del n, group_ids, num_groups, eps
  return rewards - mean


def _leave_one_out_advantages(rewards, mean, n, group_ids, num_groups, eps):
  del group_ids, num_groups, eps
  return jnp.where(n > 1, (rewards - mean) * n / jnp.maximum(n - 1.0, 1.0), 0.0)


# grpo.advantage -> (rewards, group mean, group size, group_ids, num_groups, eps) -> advantages.
ADVANTAGES = {"std": _std_advantages, "no_std": _mean_advantages, "leave_one_out": _leave_one_out_advantages}
ADVANTAGE_MODES = tuple(ADVANTAGES)


def group_advantages(rewards: jnp.ndarray, group_ids: jnp.ndarray, num_groups: int, mode: str = "std",
                     eps: float = 1e-4) -> jnp.ndarray:
  """Advantages (N,) of rewards (N,) relative to the other samples of the same prompt (`group_ids`).

  `std`: (r - mean) / (std + eps) with the unbiased std, as the paper's trainer; `no_std`: r - mean (Dr. GRPO);
  `leave_one_out`: r - mean of the *other* samples of the group (RLOO).
  """
  if mode not in ADVANTAGES:
    raise ValueError(f"Unknown advantage mode {mode!r}: use one of {ADVANTAGE_MODES}")
  rewards = rewards.astype(jnp.float32)
  count = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_groups)
  total = jax.ops.segment_sum(rewards, group_ids, num_groups)
  mean = (total / jnp.maximum(count, 1.0))[group_ids]
  return ADVANTAGES[mode](rewards, mean, count[group_ids], group_ids, num_groups, eps)


# --------------------------------------------------------------------------------------------------- the loss


def _token_mean_weights(mask):
  return mask / jnp.maximum(mask.sum(), 1.0)


def _sequence_mean_weights(mask):
  seq_tokens = mask.sum(axis=1, keepdims=True)
  num_seqs = jnp.maximum((seq_tokens > 0).sum(), 1)
  return mask / (jnp.maximum(seq_tokens, 1.0) * num_seqs)


# grpo.aggregation / sft.aggregation -> loss mask (N, L) float -> per-token weights.
AGGREGATIONS = {"sequence_mean": _sequence_mean_weights, "token_mean": _token_mean_weights}
AGGREGATION_MODES = tuple(AGGREGATIONS)


def loss_weights(loss_mask: jnp.ndarray, aggregation: str) -> jnp.ndarray:
  """Per-token weights (N, L) that sum the per-token losses into the aggregated batch loss."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"Unknown aggregation {aggregation!r}: use one of {AGGREGATION_MODES}")
  return AGGREGATIONS[aggregation](loss_mask.astype(jnp.float32))


def clipped_surrogate(logps: jnp.ndarray, ratio: jnp.ndarray, adv: jnp.ndarray,
                      gcfg: GRPOConfig) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) per token, and where the clip bit."""
  del logps
  clipped = jnp.clip(ratio, 1.0 - gcfg.eps_low, 1.0 + gcfg.eps_high)
  stats = {
      "clip_low": ((ratio < 1.0 - gcfg.eps_low) & (adv < 0)).astype(jnp.float32),
      "clip_high": ((ratio > 1.0 + gcfg.eps_high) & (adv > 0)).astype(jnp.float32)
  }
  return -jnp.minimum(ratio * adv, clipped * adv), stats


def reinforce(logps: jnp.ndarray, ratio: jnp.ndarray, adv: jnp.ndarray,
              gcfg: GRPOConfig) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """-exp(logp - stop_gradient(logp)) A per token, as the released trainers write it: 1 in value, gradient
  -A grad(logp); nothing is clipped (`ratio`, the one to the old policy, is only reported)."""
  del gcfg
  unit = jnp.exp(logps - jax.lax.stop_gradient(logps))
  zeros = jnp.zeros_like(ratio)
  return -unit * adv, {"clip_low": zeros, "clip_high": zeros}


# grpo.policy_loss -> fn(logps, ratio to the old policy, advantages (N, 1), gcfg) -> (per-token loss, clip stats).
POLICY_LOSSES = {"clipped": clipped_surrogate, "reinforce": reinforce}


def per_token_loss(logps: jnp.ndarray, old_logps: jnp.ndarray, advantages: jnp.ndarray, loss_mask: jnp.ndarray,
                   gcfg: GRPOConfig, ref_logps: jnp.ndarray | None = None,
                   is_weights: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The per-token GRPO loss (N, L) and per-token statistics (clipping indicators, ratio, KL); 0 off the mask.

  The policy term is `POLICY_LOSSES[gcfg.policy_loss]`. Log-prob differences are zeroed off the mask before any
  exp, so that padding can never overflow into NaN grads.
  """
  on = loss_mask > 0
  adv = advantages[:, None].astype(jnp.float32)
  ratio = jnp.exp(jnp.where(on, logps - old_logps, 0.0))
  loss, stats = POLICY_LOSSES[gcfg.policy_loss](jnp.where(on, logps, 0.0), ratio, adv, gcfg)
  stats["ratio"] = ratio
  if ref_logps is not None and gcfg.beta > 0:
    delta = jnp.where(on, ref_logps - logps, 0.0)
    kl = jnp.exp(delta) - delta - 1.0  # k3: unbiased, non-negative estimate of KL(policy || reference)
    loss = loss + gcfg.beta * kl
    stats["kl"] = kl
  if is_weights is not None:
    loss = loss * is_weights
  return jnp.where(on, loss, 0.0), stats
