"""Compile-time memory and FLOP plan of every device program of one training step, for a config and device count.

    python -m varft.plan --config=experiments/search.py:7b --devices=8 [--json] [--config.a.b=v ...]

No weights and no data: the shapes come from the config's recipe (rows = prompts x G, prompt and sampled lengths,
the length buckets and KV-cache size of the rollout, one image per prompt at `data.resize` (else the largest image
`image_max_pixels` allows), gradient-accumulation micro-batches, compute / master dtypes, remat). On the CLI the
devices are fake CPU devices (`--xla_force_host_platform_device_count`, set before JAX starts). Each program is
lowered from `jax.ShapeDtypeStruct`s carrying the mesh's shardings and compiled; XLA's memory analysis of the
partitioned program gives the bytes per device. FLOPs are counted analytically (`program_flops`): XLA's
cost analysis counts a scanned layer once, not once per layer.

The programs and their abstract inputs are `varft.plan_programs`'s (`PROGRAMS`); the rollout's tensor parallelism
is resolved for the target accelerator's memory (`--accelerator`; on GPU/TPU the devices' own). A program's
`peak_bytes` adds the arrays that stay resident while it runs.

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

from varft import plan_programs, sharding, train
from varft.plan_flops import program_flops
from varft.plan_hlo import hlo_buffers
from varft.preflight import ConfigError

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


class PlanError(ConfigError):
  """The run does not fit its devices (a ConfigError: `varft.main` prints it as one line)."""


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


def plan(config, devices: Sequence[jax.Device] | None = None, programs: Sequence[str] = plan_programs.PROGRAMS,
         accelerator: str | None = None, **recipe_overrides) -> list[ProgramPlan]:
  """Every (selected) device program of one step compiled for `devices` (default: all) on the config's mesh with
  its `sharding.rules`, the rollout's tensor parallelism resolved for `accelerator`'s memory (default: the devices'
  own)."""
  devices = list(jax.devices() if devices is None else devices)
  with sharding.axis_rules(config.sharding.rules):  # the layouts and the activation constraints of the config
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    model_cfg = train.model_config(config)
    rec = plan_programs.recipe(config, **recipe_overrides)
    batch_devices = sharding.batch_size_multiple(mesh)
    if rec.rows % (rec.micro_batches * batch_devices):
      raise PlanError(f"{rec.rows} rows in {rec.micro_batches} micro-batches do not split over {batch_devices} "
                      "batch devices (each device would compute every row of a micro-batch): lower "
                      "grpo.micro_batches or change rollout.prompts_per_host / num_samples / the mesh.")
    memory = ACCELERATORS[accelerator] if accelerator else device_memory_limit(devices)
    tp = plan_programs.rollout_tensor_parallel(config, model_cfg, devices, memory)
    table, images = plan_programs.programs(config, model_cfg, rec, mesh, tp)
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
               margin: float = DEFAULT_MARGIN, programs: Sequence[str] = plan_programs.PROGRAMS,
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
  plans = plan(config, jax.devices()[:f.devices], f.programs or plan_programs.PROGRAMS, f.accelerator, **kw)
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
  flags.DEFINE_list("programs", [], f"Subset of {plan_programs.PROGRAMS} (default all).")
  flags.DEFINE_bool("images", True, "One image per prompt (--noimages: text-only prompts).")
  flags.DEFINE_integer("prompt_len", 1024, "Longest prompt (tokens): the prefill chunk's bucket.")
  flags.DEFINE_integer("train_len", 0, "Training batch length; 0: the rollout's bucket of prompt + sampled.")
  flags.DEFINE_integer("cache_len", 0, "KV-cache slots per row; 0: as the rollout (max_total + largest chunk).")
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: sys.exit(main(argv)))
