"""Two GRPO updates on a fixed toy batch under a given mesh; run in-process or as a jax.distributed process.

    python -m tests.trainer.step_script OUT.npz [PROCESS_ID NUM_PROCESSES PORT]

Every process feeds only its own rows (as hosts do in training); process 0 writes the final params.
"""
from __future__ import annotations

import functools
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np

from varft import batch_placement, echo_task, grpo, grpo_loss, sharding
from varft.models.qwen25vl import text as text_model

GCFG = grpo.GRPOConfig(beta=0.04, eps_low=0.2, eps_high=0.28, tis_cap=2.0, micro_batches=2, logits_chunk=4)
MODEL = echo_task.model_config(vocab_size=64, hidden_size=32)
ROWS, LENGTH, GROUPS = 16, 12, 4


def toy_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """A right-padded batch in the rollout layout: prompts of 4 tokens, answers of varying length."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MODEL.text.vocab_size, (ROWS, LENGTH)).astype(np.int32)
  lengths = rng.integers(6, LENGTH + 1, ROWS)
  attention = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = (attention * (np.arange(LENGTH)[None] >= 4)).astype(np.float32)
  loss_mask[:, 7] = 0.0  # a "tool output" token inside the completion
  return {
      "tokens": tokens * attention,
      "attention_mask": attention,
      "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (3, ROWS, LENGTH)).copy(),
      "loss_mask": loss_mask,
      "sampler_logps": (-rng.uniform(2.0, 6.0, (ROWS, LENGTH)) * loss_mask).astype(np.float32),
      "image_index": np.full((ROWS, LENGTH), -1, np.int32),
      "group_ids": np.repeat(np.arange(GROUPS, dtype=np.int32), ROWS // GROUPS),
      "rewards": rng.uniform(0, 1, ROWS).astype(np.float32),
  }


def run(mesh_axes: dict[str, int], devices=None) -> tuple[dict[str, np.ndarray], dict]:
  """Final params (flattened by path) and the train state's shardings after two updates."""
  mesh = sharding.make_mesh(mesh_axes, devices)
  # Adam's eps well above the gradient noise: directions with an exactly-zero gradient (e.g. the key bias, which
  # softmax ignores) must not turn float rounding into full-size updates.
  optimizer, _ = grpo.make_optimizer(1e-2, 10, warmup_steps=1, eps=1e-3)
  init = lambda rng: {"text": text_model.init_params(rng, MODEL.text)}
  rng = jax.random.key(0)
  params = jax.jit(init, out_shardings=sharding.tree_shardings(jax.eval_shape(init, rng), mesh))(rng)
  state_shapes = jax.eval_shape(lambda p: grpo.init_train_state(p, optimizer), params)
  state_shardings = sharding.tree_shardings(state_shapes, mesh)
  state = jax.jit(lambda p: grpo.init_train_state(p, optimizer), out_shardings=state_shardings)(params)

  full = toy_batch()
  per_host = ROWS // jax.process_count()
  rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
  local = {k: (v[:, rows] if k == "positions" else v[rows]) for k, v in full.items()}
  batch = batch_placement.shard(local, mesh)
  logps = jax.jit(functools.partial(grpo.make_logps_fn(MODEL, GCFG), num_loss_tokens=128))
  advantages = jax.jit(lambda r, g: grpo_loss.group_advantages(r, g, GROUPS))(batch["rewards"], batch["group_ids"])
  ref = logps(params, batch)
  prepared = jax.jit(lambda b, a, r, t: grpo.prepare_batch(b, a, b["sampler_logps"], GCFG, r, t))(
      batch, advantages, ref, logps(state["params"], batch))
  # Logits only at the loss positions (the training path): 64 slots hold every micro-batch's loss tokens.
  step = jax.jit(functools.partial(grpo.make_train_step(MODEL, GCFG, optimizer), num_loss_tokens=64),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
  for _ in range(2):
    state, metrics = step(state, prepared)
  gathered = multihost_utils.process_allgather(state["params"], tiled=True)
  flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(gathered)}
  flat["loss"] = np.asarray(sharding.to_host(metrics)["train/loss"])
  return flat, state_shardings


if __name__ == "__main__":
  out = sys.argv[1]
  if len(sys.argv) > 2:
    process_id, num_processes, port = (int(a) for a in sys.argv[2:5])
    sharding.initialize_distributed(True, f"localhost:{port}", num_processes, process_id)
  flat, _ = run({"data": -1})
  if jax.process_index() == 0:
    np.savez(out, **flat)
