"""The GRPO training loop: rollouts -> rewards -> group advantages -> mu sharded updates; checkpoints, metrics.

    state = init or resume (params, AdamW state, step; data position)
    for step:
      experience = env.collect(params, rng_step)          # host: sampler + tools + rewards, this host's rows
      batch = to_devices(experience)                      # global arrays (varft.batch), rows over (data, fsdp)
      advantages = group_advantages(rewards)              # device, over the global groups
      ref_logps = logps(ref_params, batch)                # frozen reference (beta > 0)
      for epoch in range(mu): state = train_step(state, batch)   # old log-probs = the sampler's
      log / samples / eval / checkpoint

Per-step randomness is `fold_in(seed, step)`, and the data position is checkpointed, so a resumed run repeats the
uninterrupted run exactly.
"""
from __future__ import annotations

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

from varft import batch as batch_lib
from varft import checkpoint as ckpt_lib
from varft import console, grpo, metrics_writer, preflight, sharding
from varft.models.qwen25vl import config as model_config_lib
from varft.models.qwen25vl import text as text_model
from varft.preflight import ConfigError

_CHOICES = {
    "mode": ("train", "eval", "sft"),
    "sft.format": ("auto", "stepwise", "multiturn"),
    "sft.aggregation": grpo.AGGREGATION_MODES,
    "sft.schedule": ("cosine", "linear", "constant"),
    "sft.think": ("gt", "step"),
    "plan_check": ("auto", "off"),
    "task": ("echo", "agent"),
    "grpo.advantage": grpo.ADVANTAGE_MODES,
    "grpo.aggregation": grpo.AGGREGATION_MODES,
    "grpo.policy_loss": tuple(grpo.POLICY_LOSSES),
    "optim.schedule": ("cosine", "linear", "constant"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}
_POSITIVE_INTS = ("total_steps", "grpo.epochs", "grpo.micro_batches", "grpo.logits_chunk", "rollout.num_samples",
                  "rollout.prompts_per_host", "log_every", "sft.batch_size", "sft.micro_batches")
_NON_NEGATIVE = ("grpo.beta", "grpo.eps_low", "grpo.eps_high", "grpo.tis_cap", "optim.learning_rate",
                 "optim.warmup_steps", "optim.weight_decay", "optim.max_grad_norm", "checkpoint_every", "samples_every",
                 "eval_every", "sft.steps", "sft.learning_rate", "sft.warmup_steps")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    if part not in value:
      raise ConfigError(f"config.{dotted} is missing: add it to the experiment config (see experiments/).")
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the key, on values the run would otherwise trip over later."""
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f"config.{key}={value!r} is not one of {choices}")
  for key in _POSITIVE_INTS:
    value = _get(config, key)
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.{key}={value!r} must be a positive integer")
  for key in _NON_NEGATIVE:
    value = _get(config, key)
    if not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f"config.{key}={value!r} must be a non-negative number")
  if not 0 <= config.grpo.eps_low < 1:
    raise ConfigError(f"config.grpo.eps_low={config.grpo.eps_low} must be in [0, 1)")
  if config.rollout.temperature <= 0:
    raise ConfigError(f"config.rollout.temperature={config.rollout.temperature} must be > 0")
  rows = config.rollout.prompts_per_host * config.rollout.num_samples
  if rows % config.grpo.micro_batches:
    raise ConfigError(f"config.grpo.micro_batches={config.grpo.micro_batches} must divide the rows per "
                      f"host (rollout.prompts_per_host x rollout.num_samples = {rows})")
  try:
    sharding.mesh_shape(dict(config.mesh), jax.device_count())
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  if config.sft.batch_size % config.sft.micro_batches:
    raise ConfigError(f"config.sft.micro_batches={config.sft.micro_batches} must divide config.sft.batch_size="
                      f"{config.sft.batch_size}")
  if config.mode == "sft" and config.sft.steps < 1:
    raise ConfigError("config.mode=sft runs config.sft.steps supervised updates: set --config.sft.steps=N (N > 0)")
  if config.sft.steps and config.task != "agent":
    raise ConfigError(f"config.sft.steps={config.sft.steps}: the supervised phase needs reference trajectories "
                      f"(config.task='agent'), not config.task={config.task!r}")
  size = config.model.name
  if config.task == "agent" and size in ("3b", "7b") and not config.model.hf_dir:
    raise ConfigError(f"config.model.hf_dir is empty: the {size} configs fine-tune a pretrained Qwen2.5-VL; "
                      f"pass --config.model.hf_dir=/path/to/Qwen2.5-VL-{size.upper()}-Instruct")
  if config.model.get("hf_dir") and not os.path.isdir(config.model.hf_dir):
    raise ConfigError(f"config.model.hf_dir={config.model.hf_dir!r} is not a folder: point it at a "
                      "downloaded Qwen2.5-VL checkpoint (config.json + *.safetensors)")


def grpo_config(config: ml_collections.ConfigDict) -> grpo.GRPOConfig:
  g = config.grpo
  return grpo.GRPOConfig(beta=g.beta, eps_low=g.eps_low, eps_high=g.eps_high, advantage=g.advantage,
                         aggregation=g.aggregation, policy_loss=g.policy_loss, tis_cap=g.tis_cap,
                         temperature=config.rollout.temperature, micro_batches=g.micro_batches,
                         logits_chunk=g.logits_chunk, train_vision=g.train_vision)


def make_optimizer(config: ml_collections.ConfigDict):
  o = config.optim
  return grpo.make_optimizer(o.learning_rate, config.total_steps * config.grpo.epochs, warmup_steps=o.warmup_steps,
                             schedule=o.schedule, end_ratio=o.end_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                             eps=o.eps, max_grad_norm=o.max_grad_norm)


def model_config(config: ml_collections.ConfigDict) -> model_config_lib.Qwen25VLConfig:
  m = config.model
  if config.task == "echo":
    from varft import echo_task
    base = echo_task.model_config(**dict(m.get("echo", {})))
  else:
    base = model_config_lib.get_config(m.hf_dir or m.name)
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
    text_only = config.task == "echo"
    abstract = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), text_only, param_dtype))
    _, params = hf.load_pretrained(config.model.hf_dir, dtype=param_dtype, mesh=mesh,
                                   shardings=sharding.tree_shardings(abstract, mesh))
    return params
  init = functools.partial(init_params, model_cfg, text_only=config.task == "echo", param_dtype=param_dtype)
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


def loss_slots(loss_mask, minimum: int) -> int:
  """Per-row logit slots of a batch (`grpo.row_loss_token_bucket`, agreed by all hosts), at least `minimum`: with
  the bucket of `rollout.max_new_tokens` as the minimum (what the planner plans for) a run compiles its update once
  instead of once per power of two its batches happen to need."""
  return max(minimum, *sharding.gather_json(grpo.row_loss_token_bucket(loss_mask)))


def make_environment(config, model_cfg, mesh, workdir: str, training: bool = True):
  if config.task == "echo":
    from varft import echo_task
    return echo_task.EchoEnvironment(model_cfg, mesh, config.rollout.prompts_per_host, config.rollout.num_samples,
                                     temperature=config.rollout.temperature, seed=config.seed,
                                     eval_prompts=config.eval.num_prompts)
  from varft import agent_task
  return agent_task.AgentEnvironment(config, model_cfg, mesh, workdir, training=training)


class Trainer:
  """Holds the mesh, jitted functions, state and environment of one run (`run()` trains to the end)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, training: bool = True):
    validate(config)
    self.choices = preflight.check(config)
    self.config, self.workdir = config, workdir
    # Before any weights load: a training run locks its workdir and refuses checkpoints of another recipe.
    self.checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
                                              async_save=config.async_checkpoints,
                                              fingerprint=ckpt_lib.fingerprint(config) if training else None,
                                              resume=config.resume,
                                              lock=ckpt_lib.lock_workdir(workdir) if training else None,
                                              keep_steps=config.keep_checkpoint_steps)
    self.mesh = sharding.make_mesh(dict(config.mesh))
    self.model_cfg = model_config(config)
    self.gcfg = grpo_config(config)
    self.optimizer, self.lr_fn = make_optimizer(config)
    # Data, tools and the sandbox start before the weights load: a run that cannot work fails in seconds.
    self.env = make_environment(config, self.model_cfg, self.mesh, workdir, training)
    self.plan = check_plan(config, self.mesh) if training else None
    params = load_params(config, self.model_cfg, self.mesh)
    state_shapes = jax.eval_shape(lambda p: grpo.init_train_state(p, self.optimizer), params)
    self.state_shardings = sharding.tree_shardings(state_shapes, self.mesh)
    self.state = jax.jit(lambda p: grpo.init_train_state(p, self.optimizer), out_shardings=self.state_shardings)(params)
    # The frozen reference is the initial policy (separate buffers: the train state is donated every step), kept in
    # the compute dtype: every use casts it there anyway, so its log-probs are unchanged at half the memory.
    self.ref_params = None
    if self.gcfg.beta > 0:
      self.ref_params = jax.jit(lambda p: grpo.compute_params(p, self.model_cfg),
                                out_shardings=sharding.tree_shardings(params, self.mesh))(params)
    num_groups = config.rollout.prompts_per_host * jax.process_count()
    replicated = sharding.replicated(self.mesh)
    self._advantages = jax.jit(functools.partial(grpo.group_advantages, num_groups=num_groups,
                                                 mode=self.gcfg.advantage))
    self._logps = jax.jit(grpo.make_logps_fn(self.model_cfg, self.gcfg, self.mesh), static_argnames="row_loss_tokens")
    self._prepare = jax.jit(functools.partial(grpo.prepare_batch, gcfg=self.gcfg))
    self._train_step = jax.jit(grpo.make_train_step(self.model_cfg, self.gcfg, self.optimizer,
                                                    self.mesh), out_shardings=(self.state_shardings, replicated),
                               donate_argnums=0, static_argnames="row_loss_tokens")
    # Steps 1..sft_steps are supervised (varft.sft_phase), the next grpo_steps GRPO.
    self.sft_steps = int(config.sft.steps) if training else 0
    self.min_loss_slots = grpo.row_loss_token_bucket(np.ones((1, config.rollout.max_new_tokens)))
    self.grpo_steps = 0 if config.mode == "sft" else config.total_steps
    self.total_steps = self.sft_steps + self.grpo_steps
    self.sft = None
    if self.sft_steps:
      from varft import sft_phase
      self.sft = sft_phase.SupervisedPhase(config, self.model_cfg, self.mesh, workdir, self.state_shardings,
                                           lambda mask: loss_slots(mask, self.min_loss_slots))
    self.step = 0
    self.rng = jax.random.key(config.seed)
    self.last_samples: list[dict[str, Any]] = []

  def maybe_restore(self, step: int | None = None) -> bool:
    """Resumes from the latest (or the given) complete checkpoint in the workdir, if any."""
    if self.checkpointer.latest_step() is None:
      if step is not None:
        raise FileNotFoundError(f"No checkpoint in {self.checkpointer.directory} to restore step {step} from")
      return False
    abstract = ckpt_lib.abstract_like(self.state, self.state_shardings)
    self.step, self.state, data_state, _ = self.checkpointer.restore(abstract, step)
    mine = lambda hosts: (hosts or [{}])[min(jax.process_index(), len(hosts or [{}]) - 1)]
    self.env.restore_data_state(mine(data_state.get("hosts")))
    if self.sft is not None:
      self.sft.restore_data_state(mine(data_state.get("sft_hosts")))
      if self.sft_steps < self.step and self.ref_params is not None:
        reference = self._reference_checkpointer()
        self.ref_params = reference.restore(ckpt_lib.abstract_like(self.ref_params))[1]
        reference.close()
    logging.info("Resumed at step %d", self.step)
    return True

  def save(self, force: bool = False) -> None:
    data = {"hosts": sharding.gather_json(self.env.data_state())}
    if self.sft is not None:
      data["sft_hosts"] = sharding.gather_json(self.sft.data_state())
    meta = {"step": self.step, "config": self.config.to_json_best_effort()}
    self.checkpointer.save(self.step, self.state, data, meta, force=force)

  def _reference_checkpointer(self) -> ckpt_lib.Checkpointer:
    """Where the warmed-up policy is kept as GRPO's frozen reference (a resumed run reads it back)."""
    return ckpt_lib.Checkpointer(os.path.join(self.workdir, "sft_reference"), max_to_keep=1, async_save=False)

  def _start_grpo(self) -> None:
    """After the supervised phase: fresh optimizer moments on GRPO's schedule; with a KL term the warmed-up policy
    becomes the frozen reference (in the compute dtype, as the initial one), saved for a resumed run."""
    params = self.state["params"]
    if self.ref_params is not None:
      self.ref_params = jax.jit(lambda p: grpo.compute_params(p, self.model_cfg),
                                out_shardings=sharding.tree_shardings(params, self.mesh))(params)
      reference = self._reference_checkpointer()
      reference.save(self.step, self.ref_params, force=True)
      reference.close()
    reset = lambda state: grpo.init_train_state(state["params"], self.optimizer)
    self.state = jax.jit(reset, out_shardings=self.state_shardings, donate_argnums=0)(self.state)

  def train_step(self) -> dict[str, float]:
    """The next step of the run: a supervised update (the first `sft.steps`), else a GRPO step."""
    if self.step < self.sft_steps:
      self.state, metrics = self.sft.step(self.state, self.step + 1)
      self.last_samples = self.sft.last_samples
      self.step += 1
      return metrics
    if self.step == self.sft_steps and self.sft_steps:
      self._start_grpo()
    return self.grpo_step()

  def grpo_step(self) -> dict[str, float]:
    """One rollout step and its `grpo.epochs` updates; returns the metrics (all hosts agree)."""
    config, timer = self.config, time.perf_counter
    start = timer()
    rollout_rng = jax.random.fold_in(self.rng, self.step)
    experience = self.env.collect(self.state["params"], rollout_rng)
    self.last_samples = experience.samples
    collected = timer()
    local = dict(experience.batch)
    local["rewards"] = np.asarray(experience.rewards, np.float32)
    local["group_ids"] = (np.asarray(local["group_ids"], np.int32) +
                          jax.process_index() * config.rollout.prompts_per_host)
    batch = batch_lib.to_devices(local, self.mesh, self.model_cfg.vision)
    # Logits only at the sampled positions: a static per-row bucket (agreed by all hosts) >= any row's count.
    row_slots = loss_slots(local["loss_mask"], self.min_loss_slots)
    advantages = self._advantages(batch["rewards"], batch["group_ids"])
    ref_logps = self._logps(self.ref_params, batch, row_loss_tokens=row_slots) if self.gcfg.beta > 0 else None
    trainer_logps = (self._logps(self.state["params"], batch, row_loss_tokens=row_slots)
                     if self.gcfg.tis_cap > 0 else None)
    prepared = self._prepare(batch, advantages, batch["sampler_logps"], ref_logps=ref_logps,
                             trainer_logps=trainer_logps)
    for _ in range(config.grpo.epochs):
      self.state, device_metrics = self._train_step(self.state, prepared, row_loss_tokens=row_slots)
    device_metrics = sharding.to_host(device_metrics)
    updated = timer()
    self.step += 1

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
    metrics = sharding.host_mean(host)
    metrics.update({k: float(v) for k, v in device_metrics.items()})
    metrics["train/learning_rate"] = float(self.lr_fn((self.step - self.sft_steps) * config.grpo.epochs - 1))
    metrics["time/collect_s"] = collected - start
    metrics["time/update_s"] = updated - collected
    metrics["time/step_s"] = updated - start
    metrics["perf/tokens_per_s"] = metrics["rollout/tokens"] * jax.process_count() / max(updated - start, 1e-9)
    return metrics

  def evaluate(self) -> dict[str, float]:
    out_dir = os.path.join(self.workdir, "eval", f"step_{self.step:06d}")
    rng = jax.random.fold_in(jax.random.key(self.config.seed + 1), self.step)
    return sharding.host_mean(self.env.evaluate(self.state["params"], rng, out_dir if sharding.is_writer() else None))

  def run(self) -> dict[str, float]:
    """Trains (resuming if possible) to `total_steps`; returns the last logged metrics."""
    config, writer_host = self.config, sharding.is_writer()
    self.maybe_restore()
    if writer_host:
      console.write_config(self.workdir, config)
      num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state["params"]))
      print(console.start_summary(config, self.workdir, jax.devices(), dict(self.mesh.shape), num_params, self.choices),
            file=sys.stderr, flush=True)
    writer = metrics_writer.MetricsWriter(self.workdir, enabled=writer_host)
    choices = {f"run/{k}": str(v) for k, v in self.choices.items()}
    metrics: dict[str, float] = {}
    progress = console.Progress(self.total_steps, self.step, enabled=writer_host)
    exported = None
    try:
      while self.step < self.total_steps:
        metrics = self.train_step()
        last = self.step == self.total_steps
        if config.eval_every and (self.step % config.eval_every == 0 or last):
          metrics.update(self.evaluate())
        if self.step % config.log_every == 0 or last:
          writer.write(self.step, {**metrics, **choices})
        if writer_host and config.samples_every and (self.step % config.samples_every == 0 or last):
          metrics_writer.write_samples(os.path.join(self.workdir, "samples"), self.step, self.last_samples)
          writer.write_samples(self.step, self.last_samples)
        if (config.checkpoint_every and (self.step % config.checkpoint_every == 0 or last) or
            self.step in config.keep_checkpoint_steps):
          self.save(force=last)
        progress.update(self.step, metrics)
      self.checkpointer.wait()
      if config.export_hf:
        exported = ckpt_lib.export_hf(self.state["params"], self.model_cfg, os.path.join(self.workdir, "hf"),
                                      tokenizer_dir=config.model.hf_dir or None,
                                      min_pixels=config.rollout.image_min_pixels,
                                      max_pixels=config.rollout.image_max_pixels)
    finally:
      progress.close()
      writer.close()
      self.checkpointer.close()
    if writer_host:
      print(
          console.end_summary(self.workdir, metrics_writer.read_metrics(self.workdir), exported,
                              sft_steps=self.sft_steps), file=sys.stderr, flush=True)
    return metrics


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its checkpoints); returns the last metrics."""
  sharding.initialize_distributed(config.distributed)
  with sharding.axis_rules(config.sharding.rules):  # every layout and activation constraint of the run
    return Trainer(config, workdir).run()
