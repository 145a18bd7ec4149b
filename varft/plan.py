"""Compile-time memory and FLOP plan of every device program of one training step, for a config and device count.

    python -m varft.plan --config=experiments/search.py:7b --devices=8 [--json] [--config.a.b=v ...]

No weights and no data: the shapes come from the config's recipe (rows = prompts x G, prompt and sampled lengths,
the length buckets and KV-cache size of the rollout, one image per prompt at `data.resize` (else the largest image
`image_max_pixels` allows), gradient-accumulation micro-batches, compute / master dtypes, remat). On the CLI the
devices are fake CPU devices (`--xla_force_host_platform_device_count`, set before JAX starts). Each program is
lowered from `jax.ShapeDtypeStruct`s carrying the mesh's shardings and compiled; XLA's memory analysis of the
partitioned program gives the bytes per device. FLOPs are counted analytically (`program_flops`): XLA's
cost analysis counts a scanned layer once, not once per layer.

Programs: `sampling_weights` (the train params cast and resharded to the sampler's layout), `encode_images` (every
sampler device encoding its own image table), `prefill` (each prompt once, P rows padded to the scheduler's prompt-
count bucket, copied into its G rows of the cache; the prompt images encoded inside it), `extend` (an observation
chunk of the largest chunk bucket on every row; with the code tool, one observation image per row when one fits the
chunk), `generate` (decode), `reference_logps`, `train_step`. The batches are `varft.batch.abstract` (rows
over the batch axes, one image table per batch device); the sampler programs take `Sampler`'s arguments in its
layouts on the rollout mesh, from the weights as `sharding.sampling_params` reshards them, tensor-parallel as
`rollout.tensor_parallel` resolves for the target accelerator's memory (`--accelerator`; on GPU/TPU the devices'
own). A program's `peak_bytes` adds the arrays that stay resident while it runs (the train state and the reference
weights during rollouts, the rest of the state and the reference while the params are resharded, the reference
weights during the update, the train state during the reference pass).

On CPU the numbers are upper bounds for GPU/TPU: XLA:CPU has no bf16 dot, scatter or collective and widens such
operands to f32 (the planner compiles without loop-invariant code motion, so that the widening of stacked weights
stays per layer instead of copying the whole model: `CPU_COMPILER_OPTIONS`), and it materialises the KV cache's
16-bit view for the in-place write that GPU/TPU take as a bitcast.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # fake CPU devices must be requested before JAX is imported
  _devices = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_devices[-1] if _devices else 1}")

from collections.abc import Sequence
import contextlib
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np

from varft import batch as batch_lib
from varft import environment, grpo, run_config, sampling, scheduler, sharding, train
from varft.models.qwen25vl import model as qwen_model
from varft.plan_flops import program_flops
from varft.plan_hlo import hlo_buffers
from varft.preflight import ConfigError
from varft.processing import image as image_lib

GiB = 1 << 30
# HBM per device (bytes) of the accelerators the plan is checked against.
ACCELERATORS = {
    "A100-40": 40 * GiB,
    "A100-80": 80 * GiB,
    "H100-80": 80 * GiB,
    "H200": 141 * 10 ** 9,
    "TPU v4": 32 * GiB,
    "TPU v5e": 16 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v6e": 32 * GiB
}
# Kept free on every device: runtime and collective buffers, allocator fragmentation, cuDNN/XLA workspaces.
DEFAULT_MARGIN = 0.10
# XLA:CPU has no bf16 dot: it widens the operands to f32, and its loop-invariant code motion then hoists those
# converts of the whole stacked weights out of the layer and decode loops (a full f32 copy of the model that GPU
# and TPU programs, with native bf16 dots, do not have). CPU plans are compiled without that pass: the widening
# stays per layer.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
PROGRAMS = ("sampling_weights", "encode_images", "prefill", "extend", "generate", "reference_logps", "train_step")


class PlanError(ConfigError):
  """The run does not fit its devices (a ConfigError: `varft.main` prints it as one line)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The static shapes of one training step."""
  prompts: int
  samples: int  # G
  prompt_len: int  # the prefill chunk (a length bucket)
  chunk_len: int  # an observation chunk (the largest chunk bucket)
  new_tokens: int  # sampled per turn
  train_len: int  # the training batch's length bucket
  cache_len: int  # KV-cache slots per row
  image_grid: tuple[int, int, int] | None  # (t, h, w) patches of each prompt's image; None: text only
  max_image_patches: int  # patches of the largest image the rollout admits: sizes full attention's key blocks
  micro_batches: int
  row_loss_tokens: int  # per-row logit slots (grpo.row_loss_token_bucket of a full-length sample)
  patch_buckets: tuple[int, ...]

  @property
  def rows(self) -> int:
    return self.prompts * self.samples


def recipe(config, prompt_len: int = 1024, train_len: int = 0, cache_len: int = 0, with_images: bool = True) -> Recipe:
  """The step's shapes from a config, as the rollout and trainer pad them (explicit lengths override;
  `with_images=False`: text-only prompts)."""
  r = config.rollout
  prompt = sampling.bucket(min(prompt_len, r.max_total_tokens - r.max_new_tokens), r.length_buckets)
  grid = None
  if not environment.get(config.task).text_only and with_images:
    side = config.data.resize or int(r.image_max_pixels ** 0.5)
    h, w = image_lib.smart_resize(side, side, min_pixels=r.image_min_pixels, max_pixels=r.image_max_pixels)
    grid = (1, h // 14, w // 14)
  return Recipe(
      prompts=r.prompts_per_host * jax.process_count(), samples=r.num_samples, prompt_len=prompt,
      chunk_len=max(r.chunk_buckets), new_tokens=r.max_new_tokens, train_len=train_len or
      sampling.bucket(min(prompt_len + r.max_new_tokens, r.max_total_tokens), r.length_buckets), cache_len=cache_len or
      r.max_total_tokens + max(r.chunk_buckets), image_grid=grid, max_image_patches=r.image_max_pixels // 14 ** 2,
      micro_batches=config.grpo.micro_batches, row_loss_tokens=grpo.row_loss_token_bucket(np.ones(
          (1, r.max_new_tokens))), patch_buckets=tuple(r.patch_buckets))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def images_per_device(rec: Recipe, devices: int) -> int:
  """The most distinct prompts (one image each) among one device's rows: rows are split over `devices` in order and
  a prompt's G rows are consecutive (`batch.device_images`)."""
  per = rec.rows // devices
  return max(len({b // rec.samples for b in range(d * per, (d + 1) * per)}) for d in range(devices))


def table_patches(model_cfg, rec: Recipe, devices: int) -> int:
  """Patches of each device's image table, as the rollout and trainer pad it: its images on their own attention
  blocks (`batch.image_starts`), padded to the rollout's patch bucket."""
  grids = [rec.image_grid] * images_per_device(rec, devices)
  return sampling.bucket(batch_lib.image_starts(grids, model_cfg.vision)[1], rec.patch_buckets, beyond="multiple")


def abstract_batch(model_cfg, rec: Recipe, mesh, stage: str, length: int, gcfg=None) -> dict[str, Any]:
  """The one place the planner describes a batch: `batch.abstract` at the recipe's rows, with a per-device image
  table for the mesh's batch devices (none for text-only prompts). `stage='rollout'` on the sampler's mesh: a prefill
  chunk's fields and the image tables `Sampler.extend` encodes; `stage='train'`: `grpo.prepare_batch`'s output."""
  devices = sharding.batch_size_multiple(mesh)
  images = rec.image_grid is not None
  return batch_lib.abstract(rec.rows, length, stage=stage, num_devices=devices,
                            vision_cfg=model_cfg.vision if images else None,
                            patches_per_device=table_patches(model_cfg, rec, devices) if images else 0,
                            max_image_patches=rec.max_image_patches, kl=gcfg is not None and gcfg.beta > 0,
                            importance_weights=gcfg is not None and gcfg.tis_cap > 0, mesh=mesh)


def abstract_train_batch(config, model_cfg, rec: Recipe, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The training batch `grpo.train_step` consumes (`grpo.prepare_batch`'s keys), as sharded abstract arrays."""
  return abstract_batch(model_cfg, rec, mesh, "train", rec.train_len, run_config.grpo_config(config))


def _model_view(batch):
  return {k: batch[k] for k in batch_lib.MODEL_INPUTS if k in batch}


def abstract_state(config, model_cfg, optimizer, mesh):
  """(train state, reference params) as sharded abstract arrays (params in `model.param_dtype`, the frozen
  reference in the compute dtype, as the trainer keeps it)."""
  dtype = jnp.dtype(config.model.param_dtype)
  params = jax.eval_shape(lambda: train.init_params(model_cfg, jax.random.key(0),
                                                    environment.get(config.task).text_only, dtype))
  state = jax.eval_shape(lambda p: grpo.init_train_state(p, optimizer), params)
  state = _abstract(state, sharding.tree_shardings(state, mesh))
  ref = None
  if run_config.grpo_config(config).beta > 0:
    ref = jax.eval_shape(lambda p: grpo.compute_params(p, model_cfg), params)
    ref = _abstract(ref, sharding.tree_shardings(ref, mesh))
  return state, ref


def rollout_tensor_parallel(config, model_cfg, devices, memory_bytes: int | None) -> int:
  """`rollout.tensor_parallel` resolved as the agent task resolves it (over this host's devices), for devices of
  `memory_bytes` each; a text-only task (echo) samples from replicas."""
  if environment.get(config.task).text_only:
    return 1
  dtype = jnp.dtype(model_cfg.dtype)
  shapes = jax.eval_shape(lambda: train.init_params(model_cfg, jax.random.key(0), False, dtype))
  local = [d for d in devices if d.process_index == jax.process_index()]
  return sharding.resolve_tensor_parallel(config.rollout.get("tensor_parallel", "auto"),
                                          sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)), local,
                                          memory_bytes)


def _sampler(config, model_cfg, rec: Recipe, mesh, params, tp: int):
  """The rollout's Sampler on its mesh (`sharding.rollout_mesh`, `tp`-way tensor parallel) and the sampling
  weights: `params` in the compute dtype in the layout `sharding.sampling_params` gives them."""
  dtype = jnp.dtype(model_cfg.dtype)
  weights = jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), params)
  rollout_mesh = sharding.rollout_mesh(mesh, tp)
  sampler_cfg = sampling.SamplingConfig(temperature=config.rollout.temperature, top_k=config.rollout.top_k,
                                        top_p=config.rollout.top_p, max_new_tokens=rec.new_tokens)
  stop = sampling.StopTable(np.zeros((model_cfg.text.vocab_size,), np.int32), np.zeros((4, 4), np.int32), ())
  sampler = sampling.Sampler(model_cfg, sampler_cfg, stop, mesh=rollout_mesh)
  return sampler, _abstract(weights, sharding.sampling_shardings(weights, rollout_mesh))


def prefill_prompts(rec: Recipe, shards: int) -> int:
  """The prompt rows of a step's first prefill: the scheduler's prompt-count bucket of all its prompts."""
  return sampling.bucket(rec.prompts, scheduler.prompt_buckets(shards, rec.rows))


def _chunk_args(model_cfg, rec: Recipe, mesh, length: int, with_images: bool = True):
  """A `Sampler` chunk of `rec.rows` rows of `length` tokens (one image per prompt of `rec` when it has images and
  `with_images`) and its image tables, as sharded abstract arrays."""
  rec = rec if with_images else dataclasses.replace(rec, image_grid=None)
  batch = abstract_batch(model_cfg, rec, mesh, "rollout", length)
  chunk = sampling.Chunk(*(jax.ShapeDtypeStruct(batch[k].shape, jnp.int32, sharding=batch[k].sharding)
                           for k in ("tokens", "positions", "attention_mask", "image_index")))
  return chunk, (batch["pixel_values"], batch["vision_inputs"]) if "pixel_values" in batch else None


def _table_size(images):
  """(padded patches over all tables, full-attention key blocks) of a chunk's image tables."""
  return images[0].shape[0] * images[0].shape[1], images[1]["full_key_blocks"].shape[-1]


def _sampler_programs(config, model_cfg, rec: Recipe, mesh, params, tp: int):
  """encode_images / prefill / extend / generate with the Sampler's signature and layouts: rows and KV cache over
  every batch axis of the rollout mesh, each device encoding its own rows' image table inside prefill / extend."""
  sampler, weights = _sampler(config, model_cfg, rec, mesh, params, tp)
  reshard, _ = sharding.sampling_resharder(params, mesh, sampler.mesh, model_cfg.dtype)
  rec = dataclasses.replace(rec, prompts=rec.prompts // jax.process_count())  # each host samples its own prompts
  t, n = model_cfg.text, rec.rows
  sds = lambda shape, dt, *axes: jax.ShapeDtypeStruct(shape, dt, sharding=sampler.layout(shape, *axes))
  kv_shape = (t.num_layers, n, rec.cache_len, t.num_kv_heads, t.head_dim)
  cache = {
      "k": sds(kv_shape, model_cfg.dtype, 1, 3),
      "v": sds(kv_shape, model_cfg.dtype, 1, 3),
      "length": sds((n,), jnp.int32)
  }
  logits = sds((n, t.vocab_size), jnp.float32)
  prompts = dataclasses.replace(rec, prompts=prefill_prompts(rec, sampler.num_shards), samples=1)
  prompt_chunk, images = _chunk_args(model_cfg, prompts, sampler.mesh, rec.prompt_len)
  # An observation image per row when the code tool (whose output is an image) is on and one fits the chunk; search
  # observations are text.
  code = bool(config.get("tools", {}).get("use_code", False))
  fits = code and rec.image_grid is not None and int(np.prod(rec.image_grid)) // 4 <= rec.chunk_len
  observation, observed = _chunk_args(model_cfg, dataclasses.replace(rec, prompts=n, samples=1), sampler.mesh,
                                      rec.chunk_len, fits)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  generate_args = (weights, cache, logits, sds(
      (n,), jnp.int32), jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                             sharding=sharding.replicated(sampler.mesh)), sds(
                                                 (n,), jnp.int32), sds((n, rec.new_tokens), jnp.int32),
                   jnp.asarray(sampler.stop_table.token_bits), jnp.asarray(sampler.stop_table.pattern_bits))
  programs = {
      "sampling_weights": (reshard, (params,), {}),
      "prefill": (sampling._prefill_jit, (weights, cache, logits, prompt_chunk, None, images, sds((n,), jnp.int32)), {
          "model_config": model_cfg
      }),
      "extend": (sampling._extend_jit, (weights, cache, observation, None, observed, logits), {
          "model_config": model_cfg
      }),
      "generate": (sampling._generate_jit, generate_args, {
          "model_config": model_cfg,
          "sampling": sampler.sampling
      }),
  }
  tables = {"prompt_rows": (prompts.prompts, 0)}
  if images is not None:
    encode = lambda p, pv, vi: batch_lib.encode_tables(lambda x, v: qwen_model.encode_images(p, model_cfg, x, v), pv, vi
                                                      )
    programs["encode_images"] = (jax.jit(encode), (weights,) + images, {})
    tables["prefill"] = _table_size(images)
  if observed is not None:
    tables["extend"] = _table_size(observed)
  return programs, tables


def _programs(config, model_cfg, rec: Recipe, mesh, tp: int):
  """(name -> (jitted function, abstract args, static kwargs, resident bytes per device outside the args, the mesh
  it is traced under), sizes for `program_flops`: image tables -> (padded patches over all tables, key blocks) and
  `prompt_rows` -> (the prefill's prompt rows, 0))."""
  gcfg = run_config.grpo_config(config)
  optimizer, _ = train.make_optimizer(config)
  state, ref = abstract_state(config, model_cfg, optimizer, mesh)
  batch = abstract_train_batch(config, model_cfg, rec, mesh)
  per_device = lambda tree: sum(_shard_bytes(x) for x in jax.tree.leaves(tree))
  state_bytes, ref_bytes = per_device(state), per_device(ref) if ref is not None else 0
  sampler_programs, tables = _sampler_programs(config, model_cfg, rec, mesh, state["params"], tp)
  # The rollout holds the train state and the reference while it samples from the resharded weights; it traces
  # its programs under no mesh, as `Sampler` does.
  programs = {name: (*p, state_bytes + ref_bytes, None) for name, p in sampler_programs.items()}
  # Resharding reads the train params (its argument) while the rest of the state and the reference stay.
  programs["sampling_weights"] = (*sampler_programs["sampling_weights"],
                                  state_bytes - per_device(state["params"]) + ref_bytes, None)
  programs["train_step"] = (jax.jit(grpo.make_train_step(model_cfg, gcfg, optimizer, mesh), donate_argnums=0,
                                    out_shardings=(sharding.tree_shardings(state, mesh), sharding.replicated(mesh)),
                                    static_argnames=("num_loss_tokens", "row_loss_tokens")), (state, batch), {
                                        "row_loss_tokens": rec.row_loss_tokens
                                    }, ref_bytes, mesh)
  if ref is not None:
    rows = NamedSharding(mesh, batch_lib.spec("old_logps"))
    programs["reference_logps"] = (jax.jit(grpo.make_logps_fn(model_cfg, gcfg, mesh),
                                           static_argnames=("num_loss_tokens", "row_loss_tokens"),
                                           out_shardings=rows), (ref, _model_view(batch)), {
                                               "row_loss_tokens": rec.row_loss_tokens
                                           }, state_bytes, mesh)
  if "pixel_values" in batch:
    pixels, inputs = batch["pixel_values"], batch["vision_inputs"]
    tables["batch"] = (pixels.shape[0] * pixels.shape[1], inputs["full_key_blocks"].shape[-1])
  return {name: programs[name] for name in PROGRAMS if name in programs}, tables


def _shard_bytes(x) -> int:
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize


@dataclasses.dataclass
class ProgramPlan:
  program: str
  devices: int
  args_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  total_bytes: int  # args + outputs - donated + temp, per device
  peak_bytes: int  # total + the resident arrays that are not arguments
  flops: float  # analytic, whole program, all devices
  largest: list[dict]
  all_gathers: list[dict]
  tensor_parallel: int  # the rollout's sampling-weight degree (the sampler programs), else the mesh's `tensor`

  def fits(self, hbm: int, margin: float = DEFAULT_MARGIN) -> bool:
    return self.peak_bytes <= hbm * (1 - margin)

  def to_json(self, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["largest"] = out["largest"][:3]
    out["largest_all_gather_bytes"] = max((g["bytes"] for g in self.all_gathers), default=0)
    out["all_gathers"] = out["all_gathers"][:3]
    out["fits"] = {name: self.fits(hbm, margin) for name, hbm in ACCELERATORS.items()}
    return out


def plan_program(name: str, fn, args, kwargs, resident: int, mesh, flops: float, devices: int, tensor_parallel: int = 1,
                 platform: str = "cpu") -> ProgramPlan:
  """Lowers and compiles one program at abstract shapes (under `mesh`, when given: activation constraints resolve
  against it); its per-device memory, FLOPs and largest buffers."""
  with jax.sharding.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    compiled = fn.lower(*args, **kwargs).compile(CPU_COMPILER_OPTIONS if platform == "cpu" else None)
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes +
           stats.temp_size_in_bytes)
  largest, gathers = hlo_buffers(compiled.as_text())
  return ProgramPlan(name, devices, int(stats.argument_size_in_bytes), int(stats.temp_size_in_bytes),
                     int(stats.output_size_in_bytes), int(stats.alias_size_in_bytes), int(total), int(total + resident),
                     flops, largest, gathers, tensor_parallel)


def plan(config, devices: Sequence[jax.Device] | None = None, programs: Sequence[str] = PROGRAMS,
         accelerator: str | None = None, **recipe_overrides) -> list[ProgramPlan]:
  """Every (selected) device program of one step compiled for `devices` (default: all) on the config's mesh with
  its `sharding.rules`, the rollout's tensor parallelism resolved for `accelerator`'s memory (default: the devices'
  own)."""
  devices = list(jax.devices() if devices is None else devices)
  with sharding.axis_rules(config.sharding.rules):  # the layouts and the activation constraints of the config
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    model_cfg = train.model_config(config)
    rec = recipe(config, **recipe_overrides)
    batch_devices = sharding.batch_size_multiple(mesh)
    if rec.rows % (rec.micro_batches * batch_devices):
      raise PlanError(f"{rec.rows} rows in {rec.micro_batches} micro-batches do not split over {batch_devices} "
                      "batch devices (each device would compute every row of a micro-batch): lower "
                      "grpo.micro_batches or change rollout.prompts_per_host / num_samples / the mesh.")
    memory = ACCELERATORS[accelerator] if accelerator else device_memory_limit(devices)
    tp = rollout_tensor_parallel(config, model_cfg, devices, memory)
    table, images = _programs(config, model_cfg, rec, mesh, tp)
    return [
        plan_program(name, *table[name], program_flops(name, rec, model_cfg, config, images), len(devices),
                     tp if table[name][-1] is None else mesh.shape["tensor"], devices[0].platform)
        for name in programs
        if name in table
    ]


def device_memory_limit(devices: Sequence[jax.Device]) -> int | None:
  """Bytes one device may allocate, when the platform says (GPU, TPU); None on CPU."""
  return (devices[0].memory_stats() or {}).get("bytes_limit")


def check_fits(config, devices: Sequence[jax.Device] | int | None = None, accelerator: str | None = None,
               margin: float = DEFAULT_MARGIN, programs: Sequence[str] = PROGRAMS,
               **recipe_overrides) -> list[ProgramPlan]:
  """The plan of `config` on `devices` (a count: the first that many devices), raising one PlanError when a
  program does not fit `accelerator`'s HBM (default: the devices' own memory limit, when they report one)."""
  if isinstance(devices, int):
    if devices > jax.device_count():
      raise PlanError(f"check_fits: {devices} devices requested, {jax.device_count()} available "
                      "(run python -m varft.plan, which fakes them).")
    devices = jax.devices()[:devices]
  devices = list(jax.devices() if devices is None else devices)
  hbm = ACCELERATORS[accelerator] if accelerator else device_memory_limit(devices)
  plans = plan(config, devices, programs, accelerator, **recipe_overrides)
  if hbm is None:
    return plans
  for p in plans:
    if not p.fits(hbm, margin):
      buffers = ", ".join(f"{b['shape']} {b['op']} ({b['bytes'] / GiB:.2f} GiB)" for b in p.largest[:3])
      raise PlanError(f"{p.program} needs {p.peak_bytes / GiB:.1f} GiB per device, over {(1 - margin) * hbm / GiB:.1f} "
                      f"GiB ({accelerator or devices[0].device_kind} less {margin:.0%}); largest buffers: {buffers}. "
                      "Use more devices, more micro-batches (grpo.micro_batches), shorter buckets or, for the "
                      "rollout programs, a higher rollout.tensor_parallel.")
  return plans


def format_table(plans: Sequence[ProgramPlan], margin: float) -> str:
  names = list(ACCELERATORS)
  header = (f"{'program':16s} {'args':>7s} {'temp':>7s} {'total':>7s} {'peak':>7s} {'TFLOP':>9s}   fits "
            f"(peak <= HBM - {margin:.0%}): " + " ".join(names))
  tp = {p.tensor_parallel for p in plans if p.program in ("extend", "generate", "encode_images")}
  lines = [
      f"per device, GiB; {plans[0].devices} devices; rollout tensor_parallel={'/'.join(map(str, tp)) or '-'}"
      if plans else "", header
  ]
  for p in plans:
    fits = " ".join(("yes" if p.fits(ACCELERATORS[n], margin) else "NO").center(len(n)) for n in names)
    lines.append(f"{p.program:16s} {p.args_bytes / GiB:7.2f} {p.temp_bytes / GiB:7.2f} {p.total_bytes / GiB:7.2f} "
                 f"{p.peak_bytes / GiB:7.2f} {p.flops / 1e12:9.1f}   {fits}")
  return "\n".join(lines)


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  config = f.config
  config.mesh = dict(config.mesh)
  kw = {"prompt_len": f.prompt_len, "train_len": f.train_len, "cache_len": f.cache_len, "with_images": f.images}
  plans = plan(config, jax.devices()[:f.devices], f.programs or PROGRAMS, f.accelerator, **kw)
  if f.json:
    for p in plans:
      print(json.dumps(p.to_json(f.margin)))
  else:
    print(format_table(plans, f.margin))
  hbm = ACCELERATORS[f.accelerator]
  too_big = [p for p in plans if not p.fits(hbm, f.margin)]
  for p in too_big:
    buffers = "; ".join(f"{b['shape']} {b['op']} {b['bytes'] / GiB:.2f} GiB" for b in p.largest[:5])
    print(
        f"{p.program} does not fit {f.accelerator} ({p.peak_bytes / GiB:.1f} GiB > "
        f"{(1 - f.margin) * hbm / GiB:.1f} GiB); largest buffers: {buffers}", file=sys.stderr)
  return 1 if too_big else 0


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. experiments/search.py:3b.")
  flags.DEFINE_integer("devices", 1, "Devices to plan for (fake CPU devices).")
  flags.DEFINE_bool("json", False, "One JSON object per program and line.")
  flags.DEFINE_float("margin", DEFAULT_MARGIN, "Fraction of HBM kept free.")
  flags.DEFINE_enum("accelerator", "A100-80", list(ACCELERATORS),
                    "Exit 1 when a program does not fit it; rollout.tensor_parallel=auto is resolved for it.")
  flags.DEFINE_list("programs", [], f"Subset of {PROGRAMS} (default all).")
  flags.DEFINE_bool("images", True, "One image per prompt (--noimages: text-only prompts).")
  flags.DEFINE_integer("prompt_len", 1024, "Longest prompt (tokens): the prefill chunk's bucket.")
  flags.DEFINE_integer("train_len", 0, "Training batch length; 0: the rollout's bucket of prompt + sampled.")
  flags.DEFINE_integer("cache_len", 0, "KV-cache slots per row; 0: as the rollout (max_total + largest chunk).")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: sys.exit(main(argv)))
