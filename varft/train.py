"""The training loop, read top to bottom: `setup` builds a run, `train` steps it; the state is a plain pytree.

    run, state = setup(config, workdir)     # checks, workdir lock, mesh, task (data, tools), params, jitted programs
    state = restore(run, state)             # the latest checkpoint, if any
    while state["step"] < run.total_steps:
      state, metrics, samples = train_step(run, state)   # SFT warm-up steps (varft.sft_phase), then GRPO steps:
        experience = task.collect(params, rng_step, batches)   # host: sampler + tools + rewards, this host's rows
        batch = to_devices(experience)                         # global arrays (varft.batch_placement), rows sharded
        advantages, ref_logps -> mu jitted updates (varft.grpo)  # old log-probs = the sampler's
      eval / log / samples / checkpoint

`state` is {"step": int, "train": grpo.TrainState, "reference": frozen reference params or None}. Per-step
randomness is `fold_in(seed, step)`, and the data position is checkpointed, so a resumed run repeats the
uninterrupted run exactly. Tasks come by name from `varft.environment.TASKS`.
"""
from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import os
import sys
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from varft import (
    batch_placement,
    console,
    environment,
    grpo,
    grpo_loss,
    metrics_writer,
    preflight,
    run_config,
    sharding,
)
from varft import checkpoint as ckpt_lib
from varft.models.qwen25vl import config as model_config_lib
from varft.models.qwen25vl import text as text_model


def make_optimizer(config: ml_collections.ConfigDict):
  o = config.optim
  return grpo.make_optimizer(o.learning_rate, config.total_steps * config.grpo.epochs, warmup_steps=o.warmup_steps,
                             schedule=o.schedule, end_ratio=o.end_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                             eps=o.eps, max_grad_norm=o.max_grad_norm)


def model_config(config: ml_collections.ConfigDict) -> model_config_lib.Qwen25VLConfig:
  m = config.model
  base = environment.get(config.task).model_config(config)
  return base.replace(dtype=m.dtype, remat=m.remat, attention=m.attention)


def init_params(model_cfg, rng: jax.Array, text_only: bool, param_dtype) -> dict:
  if text_only:
    return {"text": text_model.init_params(rng, model_cfg.text, param_dtype)}
  from varft.models.qwen25vl import model
  return model.init_params(rng, model_cfg, param_dtype)


def load_params(config, model_cfg, mesh) -> dict:
  """Policy params, created directly in their sharded layout (random init, or an HF checkpoint)."""
  param_dtype = jnp.dtype(config.model.param_dtype)
  if config.model.get("hf_dir"):
    from varft.models.qwen25vl import hf
    text_only = environment.get(config.task).text_only
    abstract = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), text_only, param_dtype))
    _, params = hf.load_pretrained(config.model.hf_dir, dtype=param_dtype, mesh=mesh,
                                   shardings=sharding.tree_shardings(abstract, mesh))
    return params
  init = functools.partial(init_params, model_cfg, text_only=environment.get(config.task).text_only,
                           param_dtype=param_dtype)
  rng = jax.random.key(config.model.init_seed)
  shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng)


def check_plan(config, mesh):
  """The compile-time memory plan of one step (`varft.plan`) on the mesh's devices, raising `plan.PlanError` (one
  line) before any weights load when a program would not fit. Only where the devices report a memory limit (GPU,
  TPU: on CPU there is nothing to check against) and `config.plan_check` is `auto`; None when skipped."""
  from varft import plan
  devices = list(mesh.devices.flat)
  if config.plan_check == "off" or plan.device_memory_limit(devices) is None:
    return None
  return plan.check_fits(config, devices)


@dataclasses.dataclass(frozen=True)
class Run:
  """What `setup` builds once for a training run (the state that changes is passed alongside, see the module doc).

  programs: the jitted device programs by name (advantages, logps, prepare, update, reset, reference).
  """
  config: ml_collections.ConfigDict
  workdir: str
  choices: dict[str, Any]  # preflight's resolved optional parts
  checkpointer: ckpt_lib.Checkpointer
  mesh: jax.sharding.Mesh
  model_cfg: model_config_lib.Qwen25VLConfig
  gcfg: grpo.GRPOConfig
  task: environment.Task
  batches: environment.TrainData
  plan: Any  # varft.plan's per-program plan, or None where skipped
  lr_fn: Callable[[int], Any]
  state_shardings: Any
  programs: dict[str, Callable[..., Any]]
  sft: Any  # varft.sft_phase.SupervisedPhase, or None without a supervised warm-up
  sft_steps: int
  total_steps: int


def make_programs(config, model_cfg, gcfg, mesh, optimizer, state_shardings,
                  params_shardings) -> dict[str, Callable[..., Any]]:
  """The run's jitted device programs: the update itself lives in `varft.grpo`."""
  num_groups = config.rollout.prompts_per_host * jax.process_count()
  replicated = sharding.replicated(mesh)
  return {
      "advantages": jax.jit(functools.partial(grpo_loss.group_advantages, num_groups=num_groups, mode=gcfg.advantage)),
      "logps": jax.jit(grpo.make_logps_fn(model_cfg, gcfg, mesh), static_argnames="row_loss_tokens"),
      "prepare": jax.jit(functools.partial(grpo.prepare_batch, gcfg=gcfg)),
      "update": jax.jit(grpo.make_train_step(model_cfg, gcfg, optimizer,
                                             mesh), out_shardings=(state_shardings, replicated), donate_argnums=0,
                        static_argnames="row_loss_tokens"),
      # Fresh optimizer moments on GRPO's schedule (after the supervised phase).
      "reset": jax.jit(lambda state: grpo.init_train_state(state["params"], optimizer), out_shardings=state_shardings,
                       donate_argnums=0),
      # The frozen reference: separate buffers (the train state is donated every step), in the compute dtype (every
      # use casts it there anyway, so its log-probs are unchanged at half the memory).
      "reference": jax.jit(lambda p: grpo.compute_params(p, model_cfg), out_shardings=params_shardings),
  }


def setup(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, dict[str, Any]]:
  """Builds a training run and its initial state; fails, before any weights load, on what would stop it later."""
  # ---------------------------------------------------------------------------------------------------------------
  # Checks: the config, the optional parts, the workdir lock and the recipe of its checkpoints.
  # ---------------------------------------------------------------------------------------------------------------
  run_config.validate(config)
  choices = preflight.check(config)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                                       async_save=config.async_checkpoints, fingerprint=ckpt_lib.fingerprint(config),
                                       resume=config.resume, lock=ckpt_lib.lock_workdir(workdir),
                                       keep_steps=config.keep_checkpoint_steps)
  task = None
  try:
    # -------------------------------------------------------------------------------------------------------------
    # Mesh and task: data, tools and the sandbox start before the weights load (a run that cannot work fails in
    # seconds), then the compile-time memory plan.
    # -------------------------------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(dict(config.mesh))
    model_cfg, gcfg = model_config(config), run_config.grpo_config(config)
    task = environment.get(config.task).build(config, model_cfg, mesh, workdir)
    batches = task.train_data()
    plan = check_plan(config, mesh)
    # -------------------------------------------------------------------------------------------------------------
    # Parameters, train state (params, AdamW moments, update counter), frozen reference, jitted programs.
    # -------------------------------------------------------------------------------------------------------------
    optimizer, lr_fn = make_optimizer(config)
    params = load_params(config, model_cfg, mesh)
    logging.info("Parameter layout (config.sharding.rules):\n%s", sharding.layout_table(params, mesh))
    init_state = lambda p: grpo.init_train_state(p, optimizer)
    state_shardings = sharding.tree_shardings(jax.eval_shape(init_state, params), mesh)
    programs = make_programs(config, model_cfg, gcfg, mesh, optimizer, state_shardings,
                             sharding.tree_shardings(params, mesh))
    reference = programs["reference"](params) if gcfg.beta > 0 else None
    train_state = jax.jit(init_state, out_shardings=state_shardings)(params)
    # -------------------------------------------------------------------------------------------------------------
    # Phases: steps 1..sft.steps are supervised (varft.sft_phase), the next total_steps GRPO (none in mode=sft).
    # -------------------------------------------------------------------------------------------------------------
    sft_steps = int(config.sft.steps)
    sft = None
    if sft_steps:
      from varft import sft_phase
      sft = sft_phase.SupervisedPhase(config, model_cfg, mesh, workdir, state_shardings)
  except BaseException:
    if task is not None:
      task.close()
    checkpointer.close()  # drops the workdir lock now
    raise
  total_steps = sft_steps + (0 if config.mode == "sft" else config.total_steps)
  run = Run(config, workdir, choices, checkpointer, mesh, model_cfg, gcfg, task, batches, plan, lr_fn, state_shardings,
            programs, sft, sft_steps, total_steps)
  return run, {"step": 0, "train": train_state, "reference": reference}


def _reference_checkpointer(run: Run) -> ckpt_lib.Checkpointer:
  """Where the warmed-up policy is kept as GRPO's frozen reference (a resumed run reads it back)."""
  return ckpt_lib.Checkpointer(os.path.join(run.workdir, "sft_reference"), max_to_keep=1, async_save=False)


def restore(run: Run, state: dict[str, Any]) -> dict[str, Any]:
  """`state` resumed from the latest complete checkpoint in the workdir; unchanged without one."""
  if run.checkpointer.latest_step() is None:
    return state
  abstract = ckpt_lib.abstract_like(state["train"], run.state_shardings)
  restored_step, train_state, data_state, _ = run.checkpointer.restore(abstract)
  mine = lambda hosts: (hosts or [{}])[min(jax.process_index(), len(hosts or [{}]) - 1)]
  if mine(data_state.get("hosts")):
    run.batches.set_state(mine(data_state.get("hosts")))
  reference = state["reference"]
  if run.sft is not None:
    run.sft.restore_data_state(mine(data_state.get("sft_hosts")))
    if run.sft_steps < restored_step and reference is not None:
      checkpointer = _reference_checkpointer(run)
      reference = checkpointer.restore(ckpt_lib.abstract_like(reference))[1]
      checkpointer.close()
  logging.info("Resumed at step %d", restored_step)
  return {"step": restored_step, "train": train_state, "reference": reference}


def save(run: Run, state: dict[str, Any], force: bool = False) -> None:
  data = {"hosts": sharding.gather_json(run.batches.get_state())}
  if run.sft is not None:
    data["sft_hosts"] = sharding.gather_json(run.sft.data_state())
  meta = {"step": state["step"], "config": run.config.to_json_best_effort()}
  run.checkpointer.save(state["step"], state["train"], data, meta, force=force)


def start_grpo(run: Run, state: dict[str, Any]) -> dict[str, Any]:
  """After the supervised phase: fresh optimizer moments on GRPO's schedule; with a KL term the warmed-up policy
  becomes the frozen reference (in the compute dtype, as the initial one), saved for a resumed run."""
  reference = state["reference"]
  if reference is not None:
    reference = run.programs["reference"](state["train"]["params"])
    checkpointer = _reference_checkpointer(run)
    checkpointer.save(state["step"], reference, force=True)
    checkpointer.close()
  return {**state, "train": run.programs["reset"](state["train"]), "reference": reference}


def train_step(run: Run, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float], list[dict[str, Any]]]:
  """The next step of the run: a supervised update (the first `sft.steps`), else a GRPO step. Returns (state,
  metrics, samples)."""
  step = state["step"]
  if step < run.sft_steps:
    train_state, metrics = run.sft.step(state["train"], step + 1)
    return {**state, "step": step + 1, "train": train_state}, metrics, run.sft.last_samples
  if step == run.sft_steps and run.sft_steps:
    state = start_grpo(run, state)
  return grpo_step(run, state)


def grpo_step(run: Run, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float], list[dict[str, Any]]]:
  """One rollout step and its `grpo.epochs` updates; the metrics agree on all hosts."""
  config, programs, timer = run.config, run.programs, time.perf_counter
  start = timer()
  rollout_rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
  experience = run.task.collect(state["train"]["params"], rollout_rng, run.batches)
  collected = timer()
  local = dict(experience.batch)
  local["rewards"] = np.asarray(experience.rewards, np.float32)
  local["group_ids"] = (np.asarray(local["group_ids"], np.int32) +
                        jax.process_index() * config.rollout.prompts_per_host)
  batch = batch_placement.to_devices(local, run.mesh, run.model_cfg.vision)
  # Logits only at the sampled positions, at least a whole turn's bucket: the update compiles once.
  turn_slots = grpo.turn_loss_slots(config.rollout.max_new_tokens)
  row_slots = grpo.loss_slots(local["loss_mask"], turn_slots)
  logps = functools.partial(programs["logps"], batch=batch, row_loss_tokens=row_slots)
  advantages = programs["advantages"](batch["rewards"], batch["group_ids"])
  ref_logps = logps(state["reference"]) if run.gcfg.beta > 0 else None
  trainer_logps = logps(state["train"]["params"]) if run.gcfg.tis_cap > 0 else None
  prepared = programs["prepare"](batch, advantages, batch["sampler_logps"], ref_logps=ref_logps,
                                 trainer_logps=trainer_logps)
  train_state = state["train"]
  for _ in range(config.grpo.epochs):
    train_state, device_metrics = programs["update"](train_state, prepared, row_loss_tokens=row_slots)
  device_metrics = sharding.to_host(device_metrics)
  updated = timer()
  step = state["step"] + 1

  metrics = sharding.host_mean(host_metrics(experience, local))
  metrics.update({k: float(v) for k, v in device_metrics.items()})
  metrics["train/learning_rate"] = float(run.lr_fn((step - run.sft_steps) * config.grpo.epochs - 1))
  # The row length the update computes: the length bucket of the longest row (all hosts agree on it).
  metrics["train/padded_length"] = float(batch["tokens"].shape[1])
  metrics["time/collect_s"] = collected - start
  metrics["time/update_s"] = updated - collected
  metrics["time/step_s"] = updated - start
  metrics["perf/tokens_per_s"] = metrics["rollout/tokens"] * jax.process_count() / max(updated - start, 1e-9)
  return {**state, "step": step, "train": train_state}, metrics, experience.samples


def host_metrics(experience: environment.Experience, local: dict[str, Any]) -> dict[str, float]:
  """This host's metrics of a step's experience: reward parts, the task's stats (rollout, tools), lengths."""
  host = {f"reward/{k}": float(np.mean(v)) for k, v in experience.components.items()}
  host.update({k: float(v) for k, v in experience.stats.items()})
  if "rollout/tool_calls" in host and host.get("rollout/num_trajectories"):
    host["rollout/tool_calls_per_trajectory"] = host["rollout/tool_calls"] / host["rollout/num_trajectories"]
  real = np.asarray(local["attention_mask"]).any(axis=1)  # rows of prompts the rollout could not run are empty
  rewards = local["rewards"][real] if real.any() else np.zeros((1,), np.float32)
  local_tokens = float(np.sum(local["attention_mask"]))
  host.update({
      "reward/mean": float(np.mean(rewards)),
      "reward/std": float(np.std(rewards)),
      "rollout/tokens": local_tokens,
      "rollout/sequence_length": local_tokens / max(int(real.sum()), 1)
  })
  return host


def evaluate(task: environment.Task, config: ml_collections.ConfigDict, workdir: str, params,
             step: int) -> dict[str, float]:
  """The task's evaluation of `params` at `step` (predictions under `<workdir>/eval/step_<N>/`), all hosts' mean."""
  out_dir = os.path.join(workdir, "eval", f"step_{step:06d}")
  rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
  return sharding.host_mean(task.evaluate(params, rng, out_dir if sharding.is_writer() else None))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its checkpoints) to the end; returns the last logged metrics."""
  sharding.initialize_distributed(config.distributed)
  with sharding.axis_rules(config.sharding.rules):  # every layout and activation constraint of the run
    run, state = setup(config, workdir)
    writer_host = sharding.is_writer()
    writer = metrics_writer.MetricsWriter(workdir, enabled=writer_host)
    progress, exported, metrics = None, None, {}
    try:
      # -------------------------------------------------------------------------------------------------------------
      # Resume, and say what runs where.
      # -------------------------------------------------------------------------------------------------------------
      state = restore(run, state)
      if writer_host:
        console.write_config(workdir, config)
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["train"]["params"]))
        print(console.start_summary(config, workdir, jax.devices(), dict(run.mesh.shape), num_params, run.choices),
              file=sys.stderr, flush=True)
      choices = {f"run/{k}": str(v) for k, v in run.choices.items()}
      progress = console.Progress(run.total_steps, state["step"], enabled=writer_host)
      # -------------------------------------------------------------------------------------------------------------
      # The loop: a step, then the periodic work (eval, metrics, samples, checkpoints).
      # -------------------------------------------------------------------------------------------------------------
      while state["step"] < run.total_steps:
        state, metrics, samples = train_step(run, state)
        step = state["step"]
        last = step == run.total_steps
        if config.eval_every and (step % config.eval_every == 0 or last):
          metrics.update(evaluate(run.task, config, workdir, state["train"]["params"], step))
        if step % config.log_every == 0 or last:
          writer.write(step, {**metrics, **choices})
        if writer_host and config.samples_every and (step % config.samples_every == 0 or last):
          metrics_writer.write_samples(os.path.join(workdir, "samples"), step, samples)
          writer.write_samples(step, samples)
        if (config.checkpoint_every and (step % config.checkpoint_every == 0 or last) or
            step in config.keep_checkpoint_steps):
          save(run, state, force=last)
        progress.update(step, metrics)
      # -------------------------------------------------------------------------------------------------------------
      # The end: pending saves on disk, the HF export, the summary.
      # -------------------------------------------------------------------------------------------------------------
      run.checkpointer.wait()
      if config.export_hf:
        exported = ckpt_lib.export_hf(state["train"]["params"], run.model_cfg, os.path.join(workdir, "hf"),
                                      tokenizer_dir=config.model.hf_dir or None,
                                      min_pixels=config.rollout.image_min_pixels,
                                      max_pixels=config.rollout.image_max_pixels)
    finally:
      if progress is not None:
        progress.close()
      writer.close()
      run.task.close()
      run.checkpointer.close()
    if writer_host:
      print(console.end_summary(workdir, metrics_writer.read_metrics(workdir), exported, sft_steps=run.sft_steps),
            file=sys.stderr, flush=True)
    return metrics
