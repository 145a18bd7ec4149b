"""One GRPO update on a batch with images, each device holding its own rows' image table (`varft.batch`).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.trainer.image_step_script
    python -m tests.trainer.image_step_script OUT.npz [PROCESS_ID NUM_PROCESSES PORT]

The first prints `DIFF <max |params(8 devices) - params(1 device)|>`, the image table's shape and sharding, and
`HLO <shapes>`: the compiled 8-device program's array shapes that hold patches. The second writes the updated
params (one device, or an fsdp mesh over every process's devices, each process assembling its own rows) to OUT.npz.
"""
from __future__ import annotations

import functools
import re
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np
import optax

from varft import batch as batch_lib
from varft import batch_placement, echo_task, grpo, grpo_loss, sampling, sharding
from varft.models.qwen25vl import model

MODEL = echo_task.model_config(vocab_size=64)
GCFG = grpo.GRPOConfig(beta=0.0, micro_batches=2, logits_chunk=8)
PROMPTS, G = 8, 2
# The last prompt's image is the largest: on two hosts the second needs longer rows and a larger table.
GRIDS = [(1, 4, 4), (1, 4, 8), (1, 8, 4), (1, 4, 4), (1, 4, 8), (1, 4, 4), (1, 8, 4), (1, 8, 8)]
LENGTH_BUCKETS, PATCH_BUCKETS, MAX_IMAGE_PATCHES = (24, 32), (32, 64, 256), 64


def rows_and_images():
  rng = np.random.default_rng(0)
  images, rows = {}, []
  for g, grid in enumerate(GRIDS):
    patches = rng.normal(size=(int(np.prod(grid)), MODEL.vision.patch_dim)).astype(np.float32)
    images[f"img{g}"] = batch_lib.Image(patches, np.asarray(grid))
    cells = int(np.prod(grid)) // 4
    for s in range(G):
      n = 4 + cells + 6 + s
      tokens = rng.integers(2, 64, n)
      key = [None] * 4 + [f"img{g}"] * cells + [None] * (n - 4 - cells)
      local = [-1] * 4 + list(range(cells)) + [-1] * (n - 4 - cells)
      loss = [0.0] * (4 + cells) + [1.0] * (n - 4 - cells)
      logps = [-rng.uniform(1, 3) * m for m in loss]
      positions = np.broadcast_to(np.arange(n, dtype=np.int32), (3, n))
      rows.append(batch_lib.Row(g, tokens, positions, loss, logps, key, local))
  return rows, images


def assemble(rows, images, num_devices, length=None):
  """The rollout batch of `rows` (length bucketed from its own rows unless given) over `num_devices` tables."""
  length = length or sampling.bucket(max(len(r.tokens) for r in rows), LENGTH_BUCKETS)
  return batch_lib.assemble(rows, images, num_rows=len(rows), num_samples=G, num_devices=num_devices, length=length,
                            vision_cfg=MODEL.vision, patch_buckets=PATCH_BUCKETS, max_image_patches=MAX_IMAGE_PATCHES)


def step(mesh):
  """Params after one update, the prepared batch and the jitted step (for inspection); each process assembles
  its own rows (a contiguous share) with its own buckets."""
  rows, images = rows_and_images()
  per_host = len(rows) // jax.process_count()
  mine = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
  local = assemble(rows[mine], images, batch_placement.devices_per_host(mesh))
  local["rewards"] = np.linspace(0, 1, len(rows)).astype(np.float32)[mine]
  batch = batch_placement.to_devices(local, mesh, MODEL.vision)
  optimizer = optax.sgd(0.1)
  init = lambda rng: model.init_params(rng, MODEL)
  rng = jax.random.key(0)
  params = jax.jit(init, out_shardings=sharding.tree_shardings(jax.eval_shape(init, rng), mesh))(rng)
  state_shapes = jax.eval_shape(lambda p: grpo.init_train_state(p, optimizer), params)
  state_shardings = sharding.tree_shardings(state_shapes, mesh)
  state = jax.jit(lambda p: grpo.init_train_state(p, optimizer), out_shardings=state_shardings)(params)
  advantages = jax.jit(lambda r, g: grpo_loss.group_advantages(r, g, PROMPTS))(batch["rewards"], batch["group_ids"])
  prepared = jax.jit(lambda b, a: grpo.prepare_batch(b, a, b["sampler_logps"], GCFG))(batch, advantages)
  train_step = jax.jit(functools.partial(grpo.make_train_step(MODEL, GCFG, optimizer), num_loss_tokens=64),
                       out_shardings=(state_shardings, sharding.replicated(mesh)))
  new_state, _ = train_step(state, prepared)
  gathered = multihost_utils.process_allgather(new_state["params"], tiled=True)
  flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(gathered)}
  return flat, prepared, train_step, state


def main():
  reference, _, _, _ = step(sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  flat, prepared, train_step, state = step(sharding.make_mesh({"fsdp": 8}))
  print("DIFF", max(float(np.max(np.abs(flat[k] - reference[k]))) for k in reference))
  print("TABLE", prepared["pixel_values"].shape, prepared["pixel_values"].sharding.spec)
  hlo = train_step.lower(state, prepared).compile().as_text()
  # Every array shape of the per-device program that holds patches: the table (., P, 1176) or any (., P, .) of the
  # vision tower, P = 64 per device (8 x 64 = 512 for the whole batch).
  shapes = sorted(set(re.findall(r"\w+\[\d+,(?:64|512),\d+\]|\w+\[(?:64|512),\d+\]|\w+\[512\]", hlo)))
  print("HLO", " ".join(shapes))


if __name__ == "__main__":
  if len(sys.argv) == 1:
    main()
  else:
    if len(sys.argv) > 2:
      process_id, num_processes, port = (int(a) for a in sys.argv[2:5])
      sharding.initialize_distributed(True, f"localhost:{port}", num_processes, process_id)
      mesh = sharding.make_mesh({"fsdp": -1})
    else:
      mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    flat = step(mesh)[0]
    if jax.process_index() == 0:
      np.savez(sys.argv[1], **flat)
