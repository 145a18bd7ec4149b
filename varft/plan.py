"""Compile-time memory and FLOP plan of every device program of one training step, for a config and device count.

    python -m varft.plan --config=experiments/search.py:7b --devices=8 [--json] [--config.a.b=v ...]

No weights and no data: the shapes come from the config's recipe (rows = prompts x G, prompt and sampled lengths,
the length buckets and KV-cache size of the rollout, one image per prompt at `data.resize` (else the largest image
`image_max_pixels` allows), gradient-accumulation micro-batches, compute / master dtypes, remat). On the CLI the
devices are fake CPU devices (`--xla_force_host_platform_device_count`, set before JAX starts). Each program is
lowered from `jax.ShapeDtypeStruct`s carrying the mesh's shardings and compiled; XLA's memory analysis of the
partitioned program gives the bytes per device. FLOPs are counted analytically (`program_flops`): XLA's
cost analysis counts a scanned layer once, not once per layer.

Programs: `encode_images` (one rollout encoder call), `extend` (prefill of every row), `generate` (decode),
`reference_logps`, `train_step`. A program's `peak_bytes` adds the arrays that stay resident while it runs (the
optimizer state and the reference weights during rollouts, the reference weights during the update).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # fake CPU devices must be requested before JAX is imported
  _devices = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_devices[-1] if _devices else 1}")

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from varft import grpo, sampling, sharding, train  # noqa: E402
from varft.models.qwen25vl import model as qwen_model, vision  # noqa: E402
from varft.plan_flops import program_flops  # noqa: E402
from varft.processing import image as image_lib  # noqa: E402

GiB = 1 << 30
# HBM per device (bytes) of the accelerators the plan is checked against.
ACCELERATORS = {"A100-40": 40 * GiB, "A100-80": 80 * GiB, "H100-80": 80 * GiB, "H200": 141 * 10 ** 9,
                "TPU v4": 32 * GiB, "TPU v5e": 16 * GiB, "TPU v5p": 95 * GiB, "TPU v6e": 32 * GiB}
# Kept free on every device: runtime and collective buffers, allocator fragmentation, cuDNN/XLA workspaces.
DEFAULT_MARGIN = 0.10
PROGRAMS = ("encode_images", "extend", "generate", "reference_logps", "train_step")


class PlanError(ValueError):
  """The run does not fit its devices."""


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The static shapes of one training step."""
  prompts: int
  samples: int  # G
  prompt_len: int  # the prefill chunk (a length bucket)
  new_tokens: int  # sampled per turn
  train_len: int  # the training batch's length bucket
  cache_len: int  # KV-cache slots per row
  image_grid: tuple[int, int, int] | None  # (t, h, w) patches of each prompt's image; None: text only
  micro_batches: int
  row_loss_tokens: int  # per-row logit slots (grpo.row_loss_token_bucket of a full-length sample)
  patch_buckets: tuple[int, ...]

  @property
  def rows(self) -> int:
    return self.prompts * self.samples


def recipe(config, prompt_len: int = 1024, train_len: int = 0, cache_len: int = 0, with_images: bool = True
           ) -> Recipe:
  """The step's shapes from a config, as the rollout and trainer pad them (explicit lengths override;
  `with_images=False`: text-only prompts)."""
  r = config.rollout
  prompt = sampling.bucket(min(prompt_len, r.max_total_tokens - r.max_new_tokens), r.length_buckets)
  grid = None
  if config.task != "echo" and with_images:
    side = config.data.resize or int(r.image_max_pixels ** 0.5)
    h, w = image_lib.smart_resize(side, side, min_pixels=r.image_min_pixels, max_pixels=r.image_max_pixels)
    grid = (1, h // 14, w // 14)
  return Recipe(
      prompts=r.prompts_per_host * jax.process_count(), samples=r.num_samples, prompt_len=prompt, new_tokens=r.max_new_tokens,
      train_len=train_len or sampling.bucket(min(prompt_len + r.max_new_tokens, r.max_total_tokens),
                                             r.length_buckets),
      cache_len=cache_len or r.max_total_tokens + max(r.chunk_buckets), image_grid=grid,
      micro_batches=config.grpo.micro_batches, row_loss_tokens=grpo.row_loss_token_bucket(
          np.ones((1, r.max_new_tokens))), patch_buckets=tuple(r.patch_buckets))


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _vision_arrays(model_cfg, grids: np.ndarray, buckets: Sequence[int]):
  """Patches of an image table padded to the rollout's bucket, and its vision inputs with full attention per image:
  the fewest key blocks that cover each image (never dense across the images of the table)."""
  total = vision.num_patches(grids)
  padded = sampling.bucket(total, buckets, beyond="multiple")
  key_blocks = vision.vision_inputs(grids, model_cfg.vision)["full_key_blocks"].shape[1]
  inputs = vision.vision_inputs(grids, model_cfg.vision, padded, key_blocks)
  return np.zeros((padded, model_cfg.vision.patch_dim), np.float32), inputs


def abstract_train_batch(config, model_cfg, rec: Recipe, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The training batch `grpo.train_step` consumes (`grpo.prepare_batch`'s keys), as sharded abstract arrays.

  The one place the planner describes the batch layout: rows over the batch axes, the image table replicated
  (`sharding.batch_shardings`)."""
  n, length = rec.rows, rec.train_len
  i32, f32 = np.zeros((n, length), np.int32), np.zeros((n, length), np.float32)
  batch = {"tokens": i32, "attention_mask": i32, "positions": np.zeros((3, n, length), np.int32),
           "loss_mask": i32, "image_index": i32, "advantages": np.zeros((n,), np.float32),
           "loss_weights": f32, "old_logps": f32}
  gcfg = train.grpo_config(config)
  if gcfg.beta > 0:
    batch["ref_logps"] = f32
  if gcfg.tis_cap > 0:
    batch["is_weights"] = f32
  if rec.image_grid is not None:
    grids = np.asarray([rec.image_grid] * rec.prompts)
    batch["pixel_values"], batch["vision_inputs"] = _vision_arrays(model_cfg, grids, rec.patch_buckets)
  return {k: _abstract(v, sharding.batch_shardings({k: v}, mesh)[k]) for k, v in batch.items()}


def _rollout_view(batch):
  keys = ("tokens", "attention_mask", "positions", "loss_mask", "image_index", "pixel_values", "vision_inputs")
  return {k: batch[k] for k in keys if k in batch}


def abstract_state(config, model_cfg, optimizer, mesh):
  """(train state, reference params) as sharded abstract arrays (params in `model.param_dtype`, the frozen
  reference in the compute dtype, as the trainer keeps it)."""
  dtype = jnp.dtype(config.model.param_dtype)
  params = jax.eval_shape(lambda: train.init_params(model_cfg, jax.random.key(0), config.task == "echo", dtype))
  state = jax.eval_shape(lambda p: grpo.init_train_state(p, optimizer), params)
  state = _abstract(state, sharding.tree_shardings(state, mesh))
  ref = None
  if train.grpo_config(config).beta > 0:
    ref = jax.eval_shape(lambda p: grpo.compute_params(p, model_cfg), params)
    ref = _abstract(ref, sharding.tree_shardings(ref, mesh))
  return state, ref


def _rows(mesh, shape, axis=0):
  spec = [None] * len(shape)
  spec[axis] = sharding.BATCH_AXES
  return NamedSharding(mesh, P(*spec))


def _sampler_args(model_cfg, rec: Recipe, mesh):
  """Abstract cache, prompt chunk and image embeddings of the sampler's programs: every row and the KV cache split
  over the batch axes (the sampler runs on the train state's fp32 weights, as `rollout` passes them)."""
  t, dtype = model_cfg.text, jnp.dtype(model_cfg.dtype)
  n = rec.rows
  sds = lambda shape, dt, s: jax.ShapeDtypeStruct(shape, dt, sharding=s)
  kv_shape = (t.num_layers, n, rec.cache_len, t.num_kv_heads, t.head_dim)
  cache = {"k": sds(kv_shape, dtype, _rows(mesh, kv_shape, 1)), "v": sds(kv_shape, dtype, _rows(mesh, kv_shape, 1)),
           "length": sds((n,), jnp.int32, _rows(mesh, (n,)))}
  row2 = lambda length, dt=jnp.int32: sds((n, length), dt, _rows(mesh, (n, length)))
  chunk = sampling.Chunk(row2(rec.prompt_len), sds((3, n, rec.prompt_len), jnp.int32,
                                                   _rows(mesh, (3, n, rec.prompt_len), 1)),
                         row2(rec.prompt_len), row2(rec.prompt_len))
  embeds = None
  if rec.image_grid is not None:
    tokens = rec.prompts * int(np.prod(rec.image_grid)) // model_cfg.vision.spatial_merge_size ** 2
    merge = model_cfg.vision.spatial_merge_size ** 2
    rows = sampling.bucket(tokens, [b // merge for b in rec.patch_buckets], beyond="multiple")
    embeds = sds((rows, t.hidden_size), dtype, sharding.replicated(mesh))
  return cache, chunk, embeds


def _programs(config, model_cfg, rec: Recipe, mesh):
  """(name -> (jitted function, abstract args, static kwargs, resident bytes per device outside the args),
  image tables -> (padded patches, key blocks))."""
  gcfg = train.grpo_config(config)
  optimizer, _ = train.make_optimizer(config)
  state, ref = abstract_state(config, model_cfg, optimizer, mesh)
  batch = abstract_train_batch(config, model_cfg, rec, mesh)
  per_device = lambda tree: sum(_shard_bytes(x) for x in jax.tree.leaves(tree))
  opt_bytes, ref_bytes = per_device(state["opt_state"]), per_device(ref) if ref is not None else 0
  params = state["params"]
  cache, chunk, embeds = _sampler_args(model_cfg, rec, mesh)
  n, t = rec.rows, model_cfg.text
  sds = lambda shape, dt, s: jax.ShapeDtypeStruct(shape, dt, sharding=s)
  stop = sampling.StopTable(np.zeros((t.vocab_size,), np.int32), np.zeros((4, 4), np.int32), ())
  sampling_cfg = sampling.SamplingConfig(temperature=config.rollout.temperature, top_k=config.rollout.top_k,
                                         top_p=config.rollout.top_p, max_new_tokens=rec.new_tokens)
  rows1 = lambda dt=jnp.int32: sds((n,), dt, _rows(mesh, (n,)))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  generate_args = (params, cache, sds((n, t.vocab_size), jnp.float32, _rows(mesh, (n, t.vocab_size))), rows1(),
                   sds(rng.shape, rng.dtype, sharding.replicated(mesh)), rows1(),
                   sds((n, rec.new_tokens), jnp.int32, _rows(mesh, (n, rec.new_tokens))),
                   jnp.asarray(stop.token_bits), jnp.asarray(stop.pattern_bits))
  programs = {
      "extend": (sampling._extend_jit, (params, cache, chunk, embeds), {"model_config": model_cfg},
                 opt_bytes + ref_bytes),
      "generate": (sampling._generate_jit, generate_args, {"model_config": model_cfg, "sampling": sampling_cfg},
                   opt_bytes + ref_bytes),
      "train_step": (jax.jit(grpo.make_train_step(model_cfg, gcfg, optimizer, mesh), donate_argnums=0,
                             out_shardings=(sharding.tree_shardings(state, mesh), sharding.replicated(mesh)),
                             static_argnames=("num_loss_tokens", "row_loss_tokens")),
                     (state, batch), {"row_loss_tokens": rec.row_loss_tokens}, ref_bytes),
  }
  if ref is not None:
    programs["reference_logps"] = (
        jax.jit(grpo.make_logps_fn(model_cfg, gcfg, mesh), static_argnames=("num_loss_tokens", "row_loss_tokens"),
                out_shardings=_rows(mesh, (n, rec.train_len))),
        (ref, _rollout_view(batch)), {"row_loss_tokens": rec.row_loss_tokens}, per_device(state))
  images = {}
  if "vision_inputs" in batch:
    images["batch"] = (batch["pixel_values"].shape[0], batch["vision_inputs"]["full_key_blocks"].shape[1])
  if rec.image_grid is not None:
    # One rollout encoder call: as many whole images as the largest patch bucket holds.
    per_call = max(1, max(rec.patch_buckets) // int(np.prod(rec.image_grid)))
    pixels, inputs = _vision_arrays(model_cfg, np.asarray([rec.image_grid] * min(per_call, rec.prompts)),
                                    rec.patch_buckets)
    rep = sharding.replicated(mesh)
    programs["encode_images"] = (
        jax.jit(qwen_model.encode_images, static_argnums=1),
        (params, model_cfg, _abstract(pixels, rep), _abstract(inputs, jax.tree.map(lambda _: rep, inputs))), {},
        opt_bytes + ref_bytes)
    images["call"] = (pixels.shape[0], inputs["full_key_blocks"].shape[1])
  return {name: programs[name] for name in PROGRAMS if name in programs}, images


def _shard_bytes(x) -> int:
  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8}


def _shapes(text: str) -> list[tuple[int, str]]:
  out = []
  for dtype, dims in _SHAPE.findall(text):
    size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append((size * _ITEMSIZE[dtype], f"{dtype}[{dims}]"))
  return out


def _split_type(rhs: str) -> tuple[str, str]:
  """(result type, the rest) of the right-hand side of an HLO instruction; tuple types nest parentheses."""
  if not rhs.startswith("("):
    kind, _, rest = rhs.partition(" ")
    return kind, rest
  depth = 0
  for i, ch in enumerate(rhs):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rhs[:i + 1], rhs[i + 1:].lstrip()
  return rhs, ""


def hlo_buffers(hlo: str, top: int = 5) -> tuple[list[dict], list[dict]]:
  """(largest values, all-gathers) of an optimized (per-device) HLO text: [{bytes, shape, op}], largest first."""
  largest, gathers = {}, {}
  for line in hlo.splitlines():
    _, sep, rhs = line.partition(" = ")
    if not sep:
      continue
    kind, rest = _split_type(rhs.strip())
    op = rest.split("(", 1)[0]
    results = _shapes(kind)
    if not results or op in ("parameter", "tuple", "get-tuple-element", "bitcast"):
      continue
    size, shape = max(results)
    entry = {"bytes": size, "shape": shape, "op": op}
    largest.setdefault((shape, op), entry)
    if op.startswith("all-gather"):
      gathers.setdefault((shape, op), entry)
  order = lambda d: sorted(d.values(), key=lambda e: -e["bytes"])
  return order(largest)[:top], order(gathers)


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

  def fits(self, hbm: int, margin: float = DEFAULT_MARGIN) -> bool:
    return self.peak_bytes <= hbm * (1 - margin)

  def to_json(self, margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["largest"] = out["largest"][:3]
    out["largest_all_gather_bytes"] = max((g["bytes"] for g in self.all_gathers), default=0)
    out["all_gathers"] = out["all_gathers"][:3]
    out["fits"] = {name: self.fits(hbm, margin) for name, hbm in ACCELERATORS.items()}
    return out


def plan_program(name: str, fn, args, kwargs, resident: int, flops: float, devices: int, mesh) -> ProgramPlan:
  """Lowers and compiles one program at abstract shapes; its per-device memory, FLOPs and largest buffers."""
  with jax.sharding.set_mesh(mesh):  # activation constraints resolve against the mesh (sampler programs too)
    compiled = fn.lower(*args, **kwargs).compile()
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
           + stats.temp_size_in_bytes)
  largest, gathers = hlo_buffers(compiled.as_text())
  return ProgramPlan(name, devices, int(stats.argument_size_in_bytes), int(stats.temp_size_in_bytes),
                     int(stats.output_size_in_bytes), int(stats.alias_size_in_bytes), int(total),
                     int(total + resident), flops, largest, gathers)


def plan(config, devices: Sequence[jax.Device] | None = None, programs: Sequence[str] = PROGRAMS,
         **recipe_overrides) -> list[ProgramPlan]:
  """Every (selected) device program of one step compiled for `devices` (default: all) on the config's mesh."""
  devices = list(jax.devices() if devices is None else devices)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  model_cfg = train.model_config(config)
  rec = recipe(config, **recipe_overrides)
  batch_devices = sharding.batch_size_multiple(mesh)
  if rec.rows % (rec.micro_batches * batch_devices):
    raise PlanError(f"{rec.rows} rows in {rec.micro_batches} micro-batches do not split over {batch_devices} "
                    "batch devices (each device would compute every row of a micro-batch): lower "
                    "grpo.micro_batches or change rollout.prompts_per_host / num_samples / the mesh.")
  table, images = _programs(config, model_cfg, rec, mesh)
  return [plan_program(name, *table[name], program_flops(name, rec, model_cfg, config, images), len(devices), mesh)
          for name in programs if name in table]


def check_fits(config, devices: Sequence[jax.Device] | int | None = None, accelerator: str | None = None,
               margin: float = DEFAULT_MARGIN, programs: Sequence[str] = PROGRAMS, **recipe_overrides
               ) -> list[ProgramPlan]:
  """The plan of `config` on `devices` (a count: the first that many devices), raising one PlanError when a
  program does not fit `accelerator`'s HBM (default: the devices' own memory limit, when they report one)."""
  if isinstance(devices, int):
    if devices > jax.device_count():
      raise PlanError(f"check_fits: {devices} devices requested, {jax.device_count()} available "
                      "(run python -m varft.plan, which fakes them).")
    devices = jax.devices()[:devices]
  devices = list(jax.devices() if devices is None else devices)
  hbm = ACCELERATORS[accelerator] if accelerator else (devices[0].memory_stats() or {}).get("bytes_limit")
  plans = plan(config, devices, programs, **recipe_overrides)
  if hbm is None:
    return plans
  for p in plans:
    if not p.fits(hbm, margin):
      buffers = ", ".join(f"{b['shape']} {b['op']} ({b['bytes'] / GiB:.2f} GiB)" for b in p.largest[:3])
      raise PlanError(f"{p.program} needs {p.peak_bytes / GiB:.1f} GiB per device, over {(1 - margin) * hbm / GiB:.1f} "
                      f"GiB ({accelerator or devices[0].device_kind} less {margin:.0%}); largest buffers: {buffers}. "
                      "Use more devices, more micro-batches (grpo.micro_batches) or shorter buckets.")
  return plans


def format_table(plans: Sequence[ProgramPlan], margin: float) -> str:
  names = list(ACCELERATORS)
  header = (f"{'program':16s} {'args':>7s} {'temp':>7s} {'total':>7s} {'peak':>7s} {'TFLOP':>9s}   fits "
            f"(peak <= HBM - {margin:.0%}): " + " ".join(names))
  lines = [f"per device, GiB; {plans[0].devices} devices" if plans else "", header]
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
  plans = plan(config, jax.devices()[:f.devices], f.programs or PROGRAMS, **kw)
  if f.json:
    for p in plans:
      print(json.dumps(p.to_json(f.margin)))
  else:
    print(format_table(plans, f.margin))
  hbm = ACCELERATORS[f.accelerator]
  too_big = [p for p in plans if not p.fits(hbm, f.margin)]
  for p in too_big:
    buffers = "; ".join(f"{b['shape']} {b['op']} {b['bytes'] / GiB:.2f} GiB" for b in p.largest[:5])
    print(f"{p.program} does not fit {f.accelerator} ({p.peak_bytes / GiB:.1f} GiB > "
          f"{(1 - f.margin) * hbm / GiB:.1f} GiB); largest buffers: {buffers}", file=sys.stderr)
  return 1 if too_big else 0


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. experiments/search.py:3b.")
  flags.DEFINE_integer("devices", 1, "Devices to plan for (fake CPU devices).")
  flags.DEFINE_bool("json", False, "One JSON object per program and line.")
  flags.DEFINE_float("margin", DEFAULT_MARGIN, "Fraction of HBM kept free.")
  flags.DEFINE_enum("accelerator", "A100-80", list(ACCELERATORS), "Exit 1 when a program does not fit it.")
  flags.DEFINE_list("programs", [], f"Subset of {PROGRAMS} (default all).")
  flags.DEFINE_bool("images", True, "One image per prompt (--noimages: text-only prompts).")
  flags.DEFINE_integer("prompt_len", 1024, "Longest prompt (tokens): the prefill chunk's bucket.")
  flags.DEFINE_integer("train_len", 0, "Training batch length; 0: the rollout's bucket of prompt + sampled.")
  flags.DEFINE_integer("cache_len", 0, "KV-cache slots per row; 0: as the rollout (max_total + largest chunk).")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: sys.exit(main(argv)))
