"""Greedy echo rollouts of this host's own prompts from globally sharded params; in-process or as a jax.distributed
process (each host samples on its own devices from a local replica).

    python -m tests.trainer.rollout_script OUT_PREFIX [PROCESS_ID NUM_PROCESSES PORT]
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from varft import echo_task, sharding
from varft.models.qwen25vl import text as text_model

MODEL = echo_task.model_config(vocab_size=64, hidden_size=32)


def init_params(mesh):
  init = lambda rng: {"text": text_model.init_params(rng, MODEL.text)}
  rng = jax.random.key(0)
  return jax.jit(init, out_shardings=sharding.tree_shardings(jax.eval_shape(init, rng), mesh))(rng)


def run(mesh) -> dict[str, np.ndarray]:
  env = echo_task.EchoEnvironment(MODEL, mesh, prompts_per_host=4, num_samples=2)
  shown = env._shown_tokens(0, 8, 1)  # different prompts on every host
  batch, _ = env._rollout(init_params(mesh), shown, jax.random.key(1), greedy=True)
  return {"shown": shown, "tokens": batch["tokens"], "sampler_logps": batch["sampler_logps"],
          "rollout_devices": np.asarray(env.rollout_mesh.devices.size)}


if __name__ == "__main__":
  process_id, num_processes, port = (int(a) for a in sys.argv[2:5])
  sharding.initialize_distributed(True, f"localhost:{port}", num_processes, process_id)
  np.savez(f"{sys.argv[1]}_{process_id}.npz", **run(sharding.make_mesh({"data": 1, "fsdp": -1})))
