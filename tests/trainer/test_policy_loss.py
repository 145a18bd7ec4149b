"""`grpo.policy_loss='reinforce'` (the released Visual-ARFT trainers' ratio exp(logp - sg(logp))) against the
analytic REINFORCE gradient, and against the clipped surrogate where the ratios to the old policy are not 1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varft import grpo, grpo_loss

# A toy policy: one categorical per position, its logits are the parameters.
VOCAB, LENGTH = 5, 4
TOKENS = jnp.array([[1, 3, 0, 4], [2, 2, 1, 0]])
MASK = jnp.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
ADVANTAGES = jnp.array([1.5, -0.7])


def _logps(theta):
  logp = jax.nn.log_softmax(theta, axis=-1)  # (N, L, V)
  return jnp.take_along_axis(logp, TOKENS[..., None], axis=-1)[..., 0]


def _loss(theta, old_logps, gcfg):
  weights = grpo_loss.loss_weights(MASK, gcfg.aggregation)
  per_token, _ = grpo_loss.per_token_loss(_logps(theta), old_logps, ADVANTAGES, MASK, gcfg)
  return jnp.sum(per_token * weights)


def _theta(seed=0):
  return jax.random.normal(jax.random.key(seed), (2, LENGTH, VOCAB))


def test_reinforce_gradient_is_the_analytic_one_whatever_the_old_policy():
  theta = _theta()
  old = _logps(_theta(1))  # ratios far from 1
  gcfg = grpo.GRPOConfig(beta=0.0, policy_loss="reinforce")
  grads = jax.grad(_loss)(theta, old, gcfg)
  # -sum_t w_t A grad log pi(token_t) with grad_theta log softmax = onehot - softmax.
  weights = grpo_loss.loss_weights(MASK, "sequence_mean")
  score = jax.nn.one_hot(TOKENS, VOCAB) - jax.nn.softmax(theta, axis=-1)
  expected = -(weights * ADVANTAGES[:, None])[..., None] * score
  np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-7)
  # The loss value is -sum w A: the ratio is 1 in value.
  np.testing.assert_allclose(_loss(theta, old, gcfg), -jnp.sum(weights * ADVANTAGES[:, None]), rtol=1e-6)


def test_reinforce_differs_from_clipped_when_ratios_are_not_one_and_equals_it_at_one():
  theta = _theta()
  reinforce = grpo.GRPOConfig(beta=0.0, policy_loss="reinforce")
  clipped = grpo.GRPOConfig(beta=0.0, policy_loss="clipped")
  off = _logps(_theta(1))
  g_reinforce, g_clipped = jax.grad(_loss)(theta, off, reinforce), jax.grad(_loss)(theta, off, clipped)
  assert float(jnp.max(jnp.abs(g_reinforce - g_clipped))) > 1e-3
  on_policy = jax.lax.stop_gradient(_logps(theta))  # mu = 1 with exact log-probs: the same update
  np.testing.assert_allclose(
      jax.grad(_loss)(theta, on_policy, reinforce),
      jax.grad(_loss)(theta, on_policy, clipped), rtol=1e-5, atol=1e-7)


def test_reinforce_reports_no_clipping_but_the_true_ratio():
  theta = _theta()
  old = _logps(_theta(1))
  _, stats = grpo_loss.per_token_loss(_logps(theta), old, ADVANTAGES, MASK, grpo.GRPOConfig(policy_loss="reinforce"))
  assert float(jnp.sum(stats["clip_low"] + stats["clip_high"])) == 0.0
  np.testing.assert_allclose(stats["ratio"] * MASK, jnp.exp(_logps(theta) - old) * MASK, rtol=1e-6)


def test_unknown_policy_loss_is_named():
  with pytest.raises(ValueError, match="grpo.policy_loss 'ppo'"):
    grpo.GRPOConfig(policy_loss="ppo")
