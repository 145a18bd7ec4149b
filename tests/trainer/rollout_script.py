"""Greedy echo rollouts of this host's own prompts from globally sharded params; in-process or as a jax.distributed
process (each host samples on its own devices from a local replica).

    python -m tests.trainer.rollout_script OUT_PREFIX [PROCESS_ID NUM_PROCESSES PORT [TENSOR_PARALLEL]]

Writes OUT_PREFIX_<process>.npz, with `compiles`: how many programs each of 3 later steps compiled.
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from varft import echo_task, rollout_sharding, sharding
from varft.models.qwen25vl import text as text_model

MODEL = echo_task.model_config(vocab_size=64, hidden_size=32)


def init_params(mesh):
  init = lambda rng: {"text": text_model.init_params(rng, MODEL.text)}
  rng = jax.random.key(0)
  return jax.jit(init, out_shardings=sharding.tree_shardings(jax.eval_shape(init, rng), mesh))(rng)


def _count_compiles(event: str, *args, **kwargs) -> None:
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILES.append(event)


COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def run(mesh, tensor_parallel: int = 1) -> dict[str, np.ndarray]:
  """Greedy rollouts of this host's prompts, and the programs compiled in each of 3 training-like steps (params
  updated on device between steps, then resharded for sampling and sampled)."""
  env = echo_task.EchoEnvironment(MODEL, mesh, prompts_per_host=4, num_samples=2, tensor_parallel=tensor_parallel)
  shown = env._shown_tokens(0, 8, 1)  # different prompts on every host
  params = init_params(mesh)
  batch, _ = env._rollout(params, shown, jax.random.key(1), greedy=True)
  update = jax.jit(lambda p: jax.tree.map(lambda x: x * 0.999, p))
  compiles, prompts = [], env.train_data()
  for step in range(3):
    before = len(COMPILES)
    params = update(params)
    env.collect(params, jax.random.key(step), prompts)
    compiles.append(len(COMPILES) - before)
  return {
      "shown": shown,
      "tokens": batch["tokens"],
      "sampler_logps": batch["sampler_logps"],
      "rollout_devices": np.asarray(env.rollout_mesh.devices.size),
      "compiles": np.asarray(compiles),
      "q_spec": np.asarray(
          str(
              rollout_sharding.sampling_params(params, mesh,
                                               env.rollout_mesh)["text"]["layers"]["q"]["w"].sharding.spec))
  }


if __name__ == "__main__":
  process_id = 0
  if len(sys.argv) > 2:
    process_id, num_processes, port = (int(a) for a in sys.argv[2:5])
    sharding.initialize_distributed(True, f"localhost:{port}", num_processes, process_id)
  tensor_parallel = int(sys.argv[5]) if len(sys.argv) > 5 else 1
  np.savez(f"{sys.argv[1]}_{process_id}.npz", **run(sharding.make_mesh({"data": 1, "fsdp": -1}), tensor_parallel))
