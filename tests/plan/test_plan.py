"""The compile-time plan: recipe shapes, per-device bytes that fall with more devices, the fit check, and the
8-device train step's collectives (rows stay on their device: no full-length activation is all-gathered)."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import search
from varft import grpo, plan, plan_programs, rollout_sharding, run_config, sampling, sharding, train
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text

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
  rec = plan_programs.recipe(search.get_config("3b"))
  assert (rec.prompts, rec.samples, rec.rows) == (16, 8, 128)
  assert rec.prompt_len == 1024 and rec.new_tokens == 256
  assert rec.image_grid == (1, 44, 44)  # 720x720 resized under max_pixels 401408: 484 image tokens after merge
  assert rec.train_len == 2048 and rec.cache_len == 4096 + 1024  # the rollout's length bucket and cache
  assert rec.row_loss_tokens == 256 and rec.micro_batches == 16
  assert plan_programs.recipe(search.get_config("3b"), train_len=1280, cache_len=2048).train_len == 1280


def test_abstract_train_batch_is_what_prepare_batch_makes():
  config = search.get_config("demo")
  model_cfg = train.model_config(config)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rec = plan_programs.recipe(config, prompt_len=128)
  abstract = plan_programs.abstract_train_batch(config, model_cfg, rec, mesh)
  rollout = {
      k: abstract[k]
      for k in ("tokens", "attention_mask", "positions", "loss_mask", "image_index", "pixel_values", "vision_inputs")
  }
  n, length = rec.rows, rec.train_len
  logps = jax.ShapeDtypeStruct((n, length), np.float32)
  prepared = jax.eval_shape(lambda b, a, o, r: grpo.prepare_batch(b, a, o, run_config.grpo_config(config), r), rollout,
                            jax.ShapeDtypeStruct((n,), np.float32), logps, logps)
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

  out = _run([
      "-m", "varft.plan", "--config=experiments/search.py:demo", "--devices=2", "--json", "--programs=generate",
      "--prompt_len=128", "--accelerator=TPU v5e", "--margin=0.99999"
  ], devices=1)
  assert out.returncode == 1, out.stderr[-2000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record["program"] == "generate" and record["devices"] == 2
  assert record["total_bytes"] >= record["args_bytes"] + record["temp_bytes"] - record["alias_bytes"]
  assert "generate does not fit TPU v5e" in out.stderr and "largest buffers:" in out.stderr


def test_rollout_tensor_parallel_auto_is_resolved_for_the_target_accelerator():
  gib = 1 << 30
  devices = [jax.devices()[0]] * 8
  assert rollout_sharding.resolve_tensor_parallel("auto", int(7.5 * gib), devices, 80 * gib) == 1  # 3B bf16 on A100-80
  assert rollout_sharding.resolve_tensor_parallel("auto", int(7.5 * gib), devices, 16 * gib) == 2  # on v5e
  assert rollout_sharding.resolve_tensor_parallel(0, int(15.2 * gib), devices, 16 * gib) == 4  # 7B on v5e
  assert rollout_sharding.resolve_tensor_parallel("auto", 100 * gib, devices) == 1  # CPU: no memory to size by
  assert rollout_sharding.resolve_tensor_parallel("2", 1, devices) == 2 and rollout_sharding.resolve_tensor_parallel(
      8, 1) == 8
  with pytest.raises(ValueError, match="rollout.tensor_parallel='two'"):
    rollout_sharding.resolve_tensor_parallel("two", 1, devices)
  # The planner resolves the config's `auto` for the accelerator it checks against, not for the CPU it runs on.
  config = search.get_config("7b")
  model_cfg = train.model_config(config)
  assert config.rollout.tensor_parallel == "auto"
  tensor_parallel = lambda n, accelerator: plan_programs.rollout_tensor_parallel(config, model_cfg, [jax.devices()[0]] *
                                                                                 n, plan.ACCELERATORS[accelerator])
  assert tensor_parallel(16, "TPU v5e") == 4
  assert tensor_parallel(8, "A100-80") == 1


def test_tensor_parallel_sampling_weights_shrink_every_rollout_program():
  out = _script("tensor")
  replicated, tensor = out["1"], out["4"]
  for program in ("sampling_weights", "extend", "generate"):
    assert replicated[program]["tp"] == 1 and tensor[program]["tp"] == 4, out
    assert tensor[program]["args"] < replicated[program]["args"] or program == "sampling_weights", (program, out)
    assert tensor[program]["total"] < replicated[program]["total"], (program, out)


def test_resharding_moves_a_layer_of_a_stack_or_a_block_of_a_vocabulary_table_at_a_time():
  out = _script("reshard")
  # Moved whole, a leaf is held (gathered, or a tensor shard of it) in transit; a layer is 1/64 of the stack, a
  # block 1/16 of the table.
  assert out["stack"]["temp"] < out["stack"]["bytes"] / 16, out
  assert out["vocab"]["temp"] < out["vocab"]["bytes"] / 4, out


def test_rollout_programs_hold_one_kv_cache():
  base = config_lib.get_config("tiny")
  cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_layers=16))
  t, rows, slots, steps = cfg.text, 8, 4096, 8
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  params = jax.eval_shape(lambda: {"text": text.init_params(jax.random.key(0), t)})
  kv = jax.ShapeDtypeStruct((t.num_layers, rows, slots, t.num_kv_heads, t.head_dim), jnp.float32)
  cache = {"k": kv, "v": kv, "length": i32(rows)}
  cache_bytes = 2 * kv.size * 4
  chunk = sampling.Chunk(i32(rows, 32), i32(3, rows, 32), i32(rows, 32), i32(rows, 32))
  extend = sampling._extend_jit.lower(params, cache, chunk, None, None, model_config=cfg)
  hidden = jax.ShapeDtypeStruct((rows, t.hidden_size), jnp.float32)  # the next-token state
  generate = sampling._generate_jit.lower(params, cache, hidden, i32(rows), jax.random.key(0), i32(rows),
                                          i32(rows, steps), i32(t.vocab_size), i32(4, 4), model_config=cfg,
                                          sampling=sampling.SamplingConfig(max_new_tokens=steps))
  prefill = sampling._prefill_jit.lower(params, cache, hidden,
                                        sampling.Chunk(i32(2, 32), i32(3, 2, 32), i32(2, 32), i32(2, 32)), None, None,
                                        i32(rows), model_config=cfg)
  for name, lowered in (("extend", extend), ("generate", generate), ("prefill", prefill)):
    stats = lowered.compile(plan.CPU_COMPILER_OPTIONS).memory_analysis()
    # Donated and written in place, a layer at a time: no second cache among the temporaries (16 layers: a
    # layer's slice of k and v is 1/16 of it).
    assert stats.alias_size_in_bytes >= cache_bytes, name
    assert stats.temp_size_in_bytes < cache_bytes / 4, (name, stats.temp_size_in_bytes, cache_bytes)


def test_cpu_plans_keep_the_bf16_widening_inside_the_layer_loop():
  layers, dim = 16, 512
  weights = jax.ShapeDtypeStruct((layers, dim, 4 * dim), jnp.bfloat16)
  x = jax.ShapeDtypeStruct((8, dim), jnp.bfloat16)

  def forward(w, h):
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl @ wl.T), None), h, w)[0]

  p = plan.plan_program("toy", jax.jit(forward), (weights, x), {}, 0, None, 0.0, 1)
  # XLA:CPU widens bf16 dot operands to f32; hoisted out of the loop that is an f32 copy of the whole stack.
  assert p.temp_bytes < layers * dim * 4 * dim * 4 / 4, p.temp_bytes


def test_prefill_is_planned_once_per_prompt_at_the_schedulers_bucket():
  from tests.plan import plan_script
  config = plan_script.small_config()
  rec = plan_programs.recipe(config, **plan_script.SMALL)
  # The scheduler pads a prefill's prompt count to `shards` times a power of two (up to all slots).
  buckets = [plan_programs.prefill_prompts(dataclasses.replace(rec, prompts=p), s) for p, s in ((4, 1), (3, 1), (4, 8))]
  assert buckets == [4, 4, 8]
  with sharding.axis_rules(config.sharding.rules):
    mesh = sharding.make_mesh(dict(config.mesh), jax.devices()[:1])
    table, images = plan_programs.programs(config, train.model_config(config), rec, mesh, 1)
  _, args, _, _, _ = table["prefill"]
  chunk, images_arg, source = args[3], args[5], args[6]
  assert chunk.tokens.shape == (rec.prompts, rec.prompt_len)  # P prompt rows, not the B x G rows
  assert images_arg[0].shape[0] == 1 and source.shape == (rec.rows,)
  assert args[1]["k"].shape[1] == rec.rows  # copied into every row of the cache
  _, args, _, _, _ = table["extend"]
  assert args[2].tokens.shape == (rec.rows, rec.chunk_len) and args[4] is None  # search observations: text
  # Every sampler program carries the scheduler's next-token state: last hidden states, never (B, V) logits.
  hidden = (rec.rows, train.model_config(config).text.hidden_size)
  assert [table[name][1][2 if name != "extend" else 5].shape for name in ("prefill", "extend", "generate")
         ] == [hidden] * 3
  assert images["prompt_rows"] == (rec.prompts, 0)
  plans = plan.plan(config, jax.devices()[:1], programs=("prefill", "extend"), **plan_script.SMALL)
  assert [p.program for p in plans] == ["prefill", "extend"]
  prefill, extend = plans
  # One prefill of 4 prompts does a quarter of the prompt-token work of prefilling all 16 rows.
  assert prefill.flops < extend.flops * rec.prompt_len / rec.chunk_len / 2, (prefill.flops, extend.flops)
