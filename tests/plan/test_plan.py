"""The compile-time plan: recipe shapes, per-device bytes that fall with more devices, the fit check, and the
8-device train step's collectives (rows stay on their device: no full-length activation is all-gathered)."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import search
from varft import grpo, plan, sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, devices=8, timeout=900):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _script(name):
  out = _run(["-m", "tests.plan.plan_script", name])
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_recipe_has_the_papers_shapes():
  rec = plan.recipe(search.get_config("3b"))
  assert (rec.prompts, rec.samples, rec.rows) == (16, 8, 128)
  assert rec.prompt_len == 1024 and rec.new_tokens == 256
  assert rec.image_grid == (1, 44, 44)  # 720x720 resized under max_pixels 401408: 484 image tokens after merge
  assert rec.train_len == 2048 and rec.cache_len == 4096 + 1024  # the rollout's length bucket and cache
  assert rec.row_loss_tokens == 256 and rec.micro_batches == 16
  assert plan.recipe(search.get_config("3b"), train_len=1280, cache_len=2048).train_len == 1280


def test_abstract_train_batch_is_what_prepare_batch_makes():
  config = search.get_config("demo")
  model_cfg = train.model_config(config)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rec = plan.recipe(config, prompt_len=128)
  abstract = plan.abstract_train_batch(config, model_cfg, rec, mesh)
  rollout = {k: abstract[k] for k in ("tokens", "attention_mask", "positions", "loss_mask", "image_index",
                                      "pixel_values", "vision_inputs")}
  n, length = rec.rows, rec.train_len
  logps = jax.ShapeDtypeStruct((n, length), np.float32)
  prepared = jax.eval_shape(lambda b, a, o, r: grpo.prepare_batch(b, a, o, train.grpo_config(config), r),
                            rollout, jax.ShapeDtypeStruct((n,), np.float32), logps, logps)
  assert sorted(prepared) == sorted(abstract)
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), tree)
  assert shapes(prepared) == shapes(abstract)
  # One table per batch device, full attention over one image's key blocks, not the whole table's.
  assert abstract["pixel_values"].shape[0] == 1
  assert abstract["vision_inputs"]["full_key_blocks"].shape[-1] < abstract["pixel_values"].shape[1] // 64


def test_per_device_bytes_fall_as_devices_are_added():
  totals = _script("scaling")
  for program in ("extend", "generate", "reference_logps", "train_step"):
    two, four, eight = totals[program]
    assert two > four > eight, (program, totals[program])
  # Each device encodes only its own rows' images: 2 prompts' images per device on 2 devices, 1 on 4 and 8.
  two, four, eight = totals["encode_images"]
  assert two > four >= eight, totals["encode_images"]


def test_8_device_train_step_never_all_gathers_full_length_activations():
  out = _script("gathers")
  length, rows_per_device, hidden = out["train_len"], 1, 64
  per_device_activations = rows_per_device * (length - 1) * hidden * 2
  for program, gathers in out["gathers"].items():
    for g in gathers:
      dims = [int(d) for d in re.findall(r"\d+", g["shape"].split("[", 1)[1])]
      activation_like = length in dims or length - 1 in dims
      assert not (activation_like and g["bytes"] >= per_device_activations), (program, g)
  # (The loss gathers its loss-slot hidden states, rows x slots x D, for the vocabulary-parallel logits.)
  # Every weight's compute-dtype copy is pinned to the weight's sharded layout (cast before it is gathered).
  assert out["pinned"] == out["weights"] > 20


def test_step_with_activation_constraints_equals_single_device():
  assert _script("step")["diff"] <= 1e-5


def test_check_fits_raises_one_clear_error_and_the_cli_exits_non_zero():
  config = search.get_config("demo")
  config.rollout.prompts_per_host = 1
  small = dict(prompt_len=128)
  plans = plan.check_fits(config, 1, "H200", programs=("generate",), **small)
  assert plans[0].program == "generate" and plans[0].total_bytes > plans[0].args_bytes > 0
  with pytest.raises(plan.PlanError, match=r"generate needs .* GiB per device.*largest buffers: \w+\["):
    plan.check_fits(config, 1, "TPU v5e", margin=0.99999, programs=("generate",), **small)

  out = _run(["-m", "varft.plan", "--config=experiments/search.py:demo", "--devices=2", "--json",
              "--programs=generate", "--prompt_len=128", "--accelerator=TPU v5e", "--margin=0.99999"], devices=1)
  assert out.returncode == 1, out.stderr[-2000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["program"] == "generate" and record["devices"] == 2
  assert record["total_bytes"] >= record["args_bytes"] + record["temp_bytes"] - record["alias_bytes"]
  assert "generate does not fit TPU v5e" in out.stderr and "largest buffers:" in out.stderr
