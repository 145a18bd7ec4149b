"""Row-local log-prob paths the planner's programs use: per-row logit slots and micro-batched reference log-probs
give the same numbers as logits at every position."""
import dataclasses

import jax
import numpy as np

from tests.trainer import step_script
from varft import grpo


def test_row_slots_and_micro_batched_logps_equal_full_logits():
  batch = {k: np.asarray(v) for k, v in step_script.toy_batch().items()}
  params = {"text": step_script.text_model.init_params(jax.random.key(0), step_script.MODEL.text)}
  one = dataclasses.replace(step_script.GCFG, micro_batches=1)
  four = dataclasses.replace(step_script.GCFG, micro_batches=4)
  full = jax.jit(grpo.make_logps_fn(step_script.MODEL, one))(params, batch)
  slots = grpo.row_loss_token_bucket(batch["loss_mask"], minimum=1)
  assert slots == 8  # rows hold up to 7 loss tokens (12 - 4 prompt - 1 tool token)
  for gcfg in (one, four):
    got = jax.jit(grpo.make_logps_fn(step_script.MODEL, gcfg), static_argnames="row_loss_tokens")(params, batch,
                                                                                                  row_loss_tokens=slots)
    on = batch["loss_mask"] > 0
    np.testing.assert_allclose(np.asarray(got)[on], np.asarray(full)[on], atol=1e-6)
    assert np.all(np.asarray(got)[~on] == 0)
