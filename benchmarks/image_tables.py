"""Per-device memory of encoding the training batch's images: one replicated table of every image with dense full
attention (the trainer before `varft.batch`), against one table per device (its own rows' images, each image on its
own attention blocks).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/image_tables.py [--model=3b] [--images=16]

Compiles (never runs) forward + backward of the vision tower (bf16 compute, remat) on an fsdp mesh of all devices,
from abstract weights, for `--images` square images of `--side` x `--side` patches (default 44 x 44, the issue's
measurement of the paper's update: 16 prompts, one image each), and prints the XLA memory analysis per device.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from varft import batch as batch_lib
from varft import sharding
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model, vision


def compile_memory(cfg, mesh, pixel_values, vision_inputs, per_device: bool):
  params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
                        sharding.tree_shardings(params, mesh))
  spec = P(sharding.BATCH_AXES) if per_device else P()
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  pixel_values, vision_inputs = place(pixel_values), jax.tree.map(place, vision_inputs)

  def loss(p, pv, vi):
    if per_device:
      embeds = batch_lib.encode_tables(lambda a, b: model.encode_images(p, cfg, a, b), pv, vi)
    else:
      embeds = model.encode_images(p, cfg, pv, vi)
    return jnp.sum(embeds.astype(jnp.float32) ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, pixel_values, vision_inputs).compile()
  return compiled.memory_analysis()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="3b")
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--side", type=int, default=44, help="patches per image side (720 px / 14 -> 44 after resize)")
  args = parser.parse_args()
  cfg = config_lib.get_config(args.model).replace(dtype="bfloat16", remat=True)
  mesh = sharding.make_mesh({"fsdp": -1})
  devices = sharding.batch_size_multiple(mesh)
  grid = np.asarray([1, args.side, args.side])
  patches = int(np.prod(grid))
  block = vision.block_patches(cfg.vision)
  image = batch_lib.Image(np.zeros((patches, cfg.vision.patch_dim), np.float32), grid)

  total = -(-patches * args.images // 4096) * 4096
  replicated_inputs = vision.vision_inputs(np.stack([grid] * args.images), cfg.vision, total)
  old = compile_memory(cfg, mesh, np.zeros((total, cfg.vision.patch_dim), np.float32), replicated_inputs, False)

  per_device = [[image] * (args.images // devices)] * devices
  size = -(-batch_lib.table_patches(per_device, cfg.vision) // block) * block
  tables = batch_lib.image_tables(per_device, cfg.vision, size, batch_lib.key_blocks(size, patches, cfg.vision))
  new = compile_memory(cfg, mesh, tables["pixel_values"], tables["vision_inputs"], True)
  gib = 1 << 30
  for name, m, keys in (("replicated table, dense full attention", old, replicated_inputs["full_key_blocks"].shape),
                        ("per-device tables, per-image key blocks", new,
                         tables["vision_inputs"]["full_key_blocks"].shape[1:])):
    print(f"{args.model} {args.images} images of {patches} patches on {devices} devices, {name} (query x key "
          f"blocks {keys[0]} x {keys[1]}): args {m.argument_size_in_bytes / gib:.2f} GiB, temp "
          f"{m.temp_size_in_bytes / gib:.2f} GiB per device")


if __name__ == "__main__":
  main()
