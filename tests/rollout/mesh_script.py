"""Greedy rollouts with images on an 8-device rollout mesh against one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.rollout.mesh_script

8 prompts with one image each, G = 2: 16 rows, two (one prompt) per device. Prints `TOKENS <equal>`, `LOGPS <max
diff>`, `ENCODED <1 device> <8 devices>` (image encodings: (device, image) pairs) and `TABLE <shape>` (the training
batch's per-device image table); then `TP2 <tokens equal> <max logp diff> <rows per device>` with the sampling
weights 2-way tensor parallel (text and vision towers), rows over the other 4 devices.
"""
from __future__ import annotations

import io

import jax
import numpy as np
from PIL import Image

from varft import rollout, rollout_sharding, sampling, sharding, turns
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model
from varft.processing import chat

CFG = config_lib.get_config("tiny")
SIZES = [(56, 56), (84, 56), (56, 84), (112, 56), (56, 56), (84, 84), (56, 112), (84, 56)]


def _png(size, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def run(mesh, params, tokenizer, table):
  config = rollout.RolloutConfig(mode="multiturn", max_turns=1, max_new_tokens=6, max_total_tokens=512,
                                 length_buckets=(512,), temperature=0.0, patch_buckets=(64, 256),
                                 image_max_pixels=112 * 112)
  batch_devices = 1 if mesh is None else sharding.batch_size_multiple(mesh)
  engine = rollout.RolloutEngine(CFG, tokenizer, None, config, mesh=mesh, stop_table=table, batch_devices=batch_devices)
  examples = [{
      "id": str(i),
      "task": "search",
      "question": f"Q{i}",
      "images": [_png(s, i)]
  } for i, s in enumerate(SIZES)]
  if mesh is not None:
    params = rollout_sharding.sampling_params(params, mesh, mesh)
  return engine.run(params, examples, jax.random.PRNGKey(0), num_samples=2)


def main():
  tokenizer = chat.load_tokenizer()
  table = sampling.make_stop_table(tokenizer, CFG.text.vocab_size, turns.AGENT_STOP_TAGS)
  params = model.init_params(jax.random.PRNGKey(0), CFG)
  one = run(None, jax.device_put(params, jax.devices()[0]), tokenizer, table)
  mesh = rollout_sharding.rollout_mesh(sharding.make_mesh({"fsdp": 8}))
  eight = run(mesh, params, tokenizer, table)
  print("TOKENS", bool(np.array_equal(one.batch["tokens"], eight.batch["tokens"])))
  print("LOGPS", float(np.max(np.abs(one.batch["sampler_logps"] - eight.batch["sampler_logps"]))))
  print("ENCODED", one.stats["images_encoded"], eight.stats["images_encoded"])
  print("TABLE", "x".join(map(str, eight.batch["pixel_values"].shape)))
  tensor = run(rollout_sharding.rollout_mesh(sharding.make_mesh({"fsdp": 8}), 2), params, tokenizer, table)
  print("TP2", bool(np.array_equal(one.batch["tokens"], tensor.batch["tokens"])),
        float(np.max(np.abs(one.batch["sampler_logps"] - tensor.batch["sampler_logps"]))),
        tensor.batch["pixel_values"].shape[0])


if __name__ == "__main__":
  main()
