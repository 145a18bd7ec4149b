"""Planner and sharded-step checks that need 8 fake devices (run as a subprocess by test_plan.py).

    python -m tests.plan.plan_script scaling | gathers | step | tensor | reshard
"""
from __future__ import annotations

import functools
import json
import sys

import jax
import numpy as np

from experiments import search
from tests.trainer import step_script
from varft import batch_placement, grpo, plan, plan_programs, rollout_sharding, sharding, train

# The demo recipe cut down: the tiny model, 16 rows of 192 tokens, one 112x112 image per prompt.
SMALL = dict(prompt_len=160)


def small_config(dtype: str = "float32"):
  c = search.get_config("demo")
  c.model.dtype = dtype
  c.model.remat = True
  c.rollout.prompts_per_host = 4  # 16 rows: micro-batches of 8 rows, one per device on 8 devices
  c.grpo.micro_batches = 2
  c.grpo.beta = 0.04  # the paper's KL term, so the reference log-probs are planned (the demo runs without it)
  c.rollout.max_new_tokens = 32
  c.rollout.max_total_tokens = 192
  c.rollout.length_buckets = (160, 192)
  c.rollout.chunk_buckets = (32,)
  c.rollout.patch_buckets = (64, 128, 256)  # one 8x8-patch image per device table: 64, two: 128
  c.rollout.image_max_pixels = 112 * 112
  return c


def scaling():
  """Per-device bytes of every program on 2, 4 and 8 devices."""
  out = {}
  for n in (2, 4, 8):
    for p in plan.plan(small_config(), jax.devices()[:n], **SMALL):
      out.setdefault(p.program, []).append(p.total_bytes)
  print(json.dumps(out))


def gathers():
  """Every all-gather of the 8-device train step and reference log-probs (bf16 compute, fp32 master weights)."""
  config = small_config("bfloat16")
  rec = plan_programs.recipe(config, **SMALL)
  plans = plan.plan(config, jax.devices()[:8], programs=("train_step", "reference_logps"), **SMALL)
  # The compute-dtype copy of every weight is pinned to the weight's own (sharded) layout before any use.
  mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:8])
  table, _ = plan_programs.programs(config, train.model_config(config), rec, mesh, 1)
  fn, args, kwargs, *_ = table["train_step"]
  with jax.sharding.set_mesh(mesh):
    lowered = fn.lower(*args, **kwargs).as_text()
  constrained = {line.rsplit(": ", 1)[-1].strip() for line in lowered.splitlines() if "sharding_constraint" in line}
  weights = [x.shape for x in jax.tree.leaves(args[0]["params"]) if x.ndim >= 2]
  pinned = [s for s in weights if "tensor<" + "x".join(map(str, s)) + "xbf16>" in constrained]
  print(
      json.dumps({
          "train_len": rec.train_len,
          "rows": rec.rows,
          "weights": len(weights),
          "pinned": len(pinned),
          "gathers": {
              p.program: p.all_gathers for p in plans
          }
      }))


def step():
  """Params after one update: one device without a mesh vs 8 devices with activation constraints."""
  model, gcfg = step_script.MODEL, step_script.GCFG
  optimizer, _ = grpo.make_optimizer(1e-2, 10, warmup_steps=1, eps=1e-3)
  batch = step_script.toy_batch()
  rng = jax.random.key(0)
  params = {"text": step_script.text_model.init_params(rng, model.text)}
  prepared = grpo.prepare_batch(batch, np.linspace(-1, 1, step_script.ROWS), batch["sampler_logps"], gcfg,
                                batch["sampler_logps"] - 0.1, batch["sampler_logps"] + 0.05)
  results = []
  for mesh in (None, sharding.make_mesh({"fsdp": 8})):
    state = grpo.init_train_state(params, optimizer)
    fn = grpo.make_train_step(model, gcfg, optimizer, mesh)
    if mesh is not None:
      state = jax.device_put(state, sharding.tree_shardings(state, mesh))
      prepared = batch_placement.shard({k: np.asarray(v) for k, v in prepared.items()}, mesh)
    new_state, _ = jax.jit(functools.partial(fn, row_loss_tokens=16))(state, prepared)
    results.append(jax.tree.leaves(jax.device_get(new_state["params"])))
  print(json.dumps({"diff": max(float(np.max(np.abs(a - b))) for a, b in zip(*results))}))


def tensor():
  """The sampler programs on 8 devices with the sampling weights replicated and 4-way tensor parallel."""
  out = {}
  for tp in (1, 4):
    config = small_config()
    config.rollout.tensor_parallel = str(tp)  # the key is a string: auto or a number
    plans = plan.plan(config, jax.devices()[:8], programs=("sampling_weights", "extend", "generate"), **SMALL)
    out[tp] = {p.program: {"args": p.args_bytes, "total": p.total_bytes, "tp": p.tensor_parallel} for p in plans}
  print(json.dumps(out))


def reshard():
  """Temporaries of the train -> sampling reshard (fsdp=8 -> tensor=2) of one stacked 64-layer weight and of one
  vocabulary table, each against its float32 size."""
  mesh = sharding.make_mesh({"fsdp": 8})
  out = {}
  for name, path, shape, spec in (("stack", ("layers", "up", "w"), (64, 64, 4096), (None, "fsdp")),
                                  ("vocab", ("embed",), (32768, 512), (None, "fsdp"))):
    leaf = jax.ShapeDtypeStruct(shape, np.float32,
                                sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
    params = {"text": functools.reduce(lambda tree, key: {key: tree}, reversed(path), leaf)}
    fn, _ = rollout_sharding.sampling_resharder(params, mesh, rollout_sharding.rollout_mesh(mesh, 2), "bfloat16")
    stats = fn.lower(params).compile(plan.CPU_COMPILER_OPTIONS).memory_analysis()
    out[name] = {"temp": stats.temp_size_in_bytes, "bytes": int(np.prod(shape)) * 4}
  print(json.dumps(out))


if __name__ == "__main__":
  {"scaling": scaling, "gathers": gathers, "step": step, "tensor": tensor, "reshard": reshard}[sys.argv[1]]()
