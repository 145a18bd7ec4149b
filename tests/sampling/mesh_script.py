"""Greedy sampling on a rollout mesh of 8 devices against one device, from FSDP-sharded train params.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sampling.mesh_script

Prints one `CASE <train mesh> tp=<n> equal=<bool> cache=<per-device cache shape> tokens=<per-device rows>
weights=<spec of a q weight>` line per layout, then `COMPILES <n> <n> <n>`: the programs held (resharding + extend +
generate) after each of 3 steps that reshard freshly updated train params to a tp=2 rollout mesh and sample.
"""
from __future__ import annotations

import jax
import numpy as np

from varft import rollout_sharding, sampling, sharding, turns
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text
from varft.processing import chat

CFG = config_lib.get_config("tiny")
ROWS = [[9707, 11, 1879], [785, 6722], [40], [1, 2, 3, 4], [5, 6], [7], [8, 9, 10], [11, 12, 13, 14, 15]]


def greedy(params, mesh, table):
  s = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=0, max_new_tokens=6), table, mesh=mesh)
  hidden, cache = s.extend(params, s.new_cache(8, 32), sampling.text_chunk(ROWS, [0] * 8, 8))
  out, cache = s.generate(params, cache, hidden, [len(r) for r in ROWS], jax.random.PRNGKey(0), [6] * 8)
  return out, cache


def main():
  table = sampling.make_stop_table(chat.load_tokenizer(), CFG.text.vocab_size, turns.AGENT_STOP_TAGS)
  init = lambda rng: {"text": text.init_params(rng, CFG.text)}
  reference, _ = greedy(jax.device_put(init(jax.random.PRNGKey(0)), jax.devices()[0]), None, table)
  for axes, tp in (({"fsdp": 8}, 1), ({"data": 2, "fsdp": 4}, 1), ({"fsdp": 8}, 2), ({"fsdp": 8}, 4)):
    mesh = sharding.make_mesh(axes)
    rng = jax.random.PRNGKey(0)
    params = jax.jit(init, out_shardings=sharding.tree_shardings(jax.eval_shape(init, rng), mesh))(rng)
    rollout_mesh = rollout_sharding.rollout_mesh(mesh, tp)
    weights = rollout_sharding.sampling_params(params, mesh, rollout_mesh)
    out, cache = greedy(weights, rollout_mesh, table)
    equal = bool(np.array_equal(np.asarray(out.tokens), np.asarray(reference.tokens)))
    cache_shard = cache["k"].addressable_shards[0].data.shape
    token_rows = out.tokens.addressable_shards[0].data.shape[0]
    print("CASE", "x".join(f"{k}{v}" for k, v in axes.items()), f"tp={tp}", f"equal={equal}",
          "cache=" + "x".join(map(str, cache_shard)), f"tokens={token_rows}",
          "weights=" + str(weights["text"]["layers"]["q"]["w"].sharding.spec).replace(" ", ""))
  compiles(table)


def compiles(table):
  """Three steps of (new train params -> bf16 sampling weights -> extend + generate) on a tp=2 rollout mesh; the
  number of XLA compiles (any program) after each."""
  backend_compiles = []
  jax.monitoring.register_event_duration_secs_listener(lambda event, _, **kw: backend_compiles.append(event)
                                                       if event.endswith("backend_compile_duration") else None)
  mesh = sharding.make_mesh({"fsdp": 8})
  rollout_mesh = rollout_sharding.rollout_mesh(mesh, 2)
  train_params = lambda rng: {"text": text.init_params(rng, CFG.text)}
  init = jax.jit(train_params,
                 out_shardings=sharding.tree_shardings(jax.eval_shape(train_params, jax.random.PRNGKey(0)), mesh))
  counts = []
  for step in range(3):
    params = init(jax.random.PRNGKey(step))
    out, _ = greedy(rollout_sharding.sampling_params(params, mesh, rollout_mesh, "bfloat16"), rollout_mesh, table)
    np.asarray(out.tokens)
    counts.append(len(backend_compiles))
  print("COMPILES", *counts)


if __name__ == "__main__":
  main()
