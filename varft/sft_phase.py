"""The supervised phase of a run: reference batches -> the sharded SFT step, its data position, its summary.

`config.mode=sft` runs only this phase (`sft.steps` updates); `config.mode=train` with `sft.steps > 0` runs it as a
warm-up before GRPO, in one run with one step counter (SFT steps 1..S, then GRPO steps S+1..S+total_steps), so
checkpoints and resume work in the middle of either phase. The phase has its own optimizer schedule
(`sft.learning_rate`, ...) with the same structure as GRPO's, so one train state (and one checkpoint layout) serves
both; GRPO starts from fresh optimizer moments and, with `grpo.beta > 0`, takes the warmed-up policy as its frozen
reference.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from varft import batch_placement, grpo, sft, sft_data, sharding
from varft.processing import image as image_lib


def sft_config(config: ml_collections.ConfigDict) -> sft.SFTConfig:
  return sft.SFTConfig(aggregation=config.sft.aggregation, micro_batches=config.sft.micro_batches,
                       logits_chunk=config.grpo.logits_chunk, train_vision=config.grpo.train_vision)


def make_optimizer(config: ml_collections.ConfigDict):
  """The SFT schedule with GRPO's AdamW settings (the same optimizer-state structure)."""
  s, o = config.sft, config.optim
  return grpo.make_optimizer(s.learning_rate, s.steps, warmup_steps=s.warmup_steps, schedule=s.schedule,
                             end_ratio=o.end_ratio, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                             max_grad_norm=o.max_grad_norm)


def row_format(config: ml_collections.ConfigDict) -> str:
  fmt = config.sft.format
  return config.rollout.mode if fmt == "auto" else fmt


def load_references(config: ml_collections.ConfigDict, workdir: str):
  """The reference records (`sft.data`, default `data.train`) through `varft.data`, as the RL mode reads them."""
  from varft import agent_task
  dataset = config.sft.data or config.data.train
  return agent_task.training_source(config, agent_task.data_paths(config, workdir), dataset)


class SupervisedPhase:
  """Batches of reference rows (the `varft.batch` schema) and the jitted SFT step on the trainer's mesh and
  train-state shardings."""

  def __init__(self, config: ml_collections.ConfigDict, model_cfg, mesh, workdir: str, state_shardings):
    from varft.data import input_pipeline
    from varft.processing import chat
    self.config, self.model_cfg, self.mesh = config, model_cfg, mesh
    self.scfg = sft_config(config)
    self.optimizer, self.lr_fn = make_optimizer(config)
    self.format = row_format(config)
    self.rows = config.sft.batch_size
    self.num_devices = batch_placement.devices_per_host(mesh)
    r = config.rollout
    self.length_buckets = tuple(config.sft.length_buckets or r.length_buckets)
    self.max_image_patches = r.image_max_pixels // model_cfg.vision.patch_size ** 2
    self.tokenizer = chat.load_tokenizer(config.model.hf_dir or None)
    self.builder_args = dict(merge=model_cfg.vision.spatial_merge_size, min_pixels=r.image_min_pixels,
                             max_pixels=r.image_max_pixels, max_tool_output_tokens=r.max_tool_output_tokens,
                             system_prompt=r.system_prompt, think=config.sft.think)
    self.source = sft_data.ReferenceSource(load_references(config, workdir), self.format)
    self.batches = input_pipeline.batches(self.source, batch_size=self.rows, seed=config.seed + 17, transform=None)
    self.resize = image_lib.square_resizer(config.data.resize)
    self._prepare = jax.jit(lambda b: sft.prepare_batch(b, self.scfg))
    self._step = jax.jit(sft.make_sft_step(model_cfg, self.scfg, self.optimizer,
                                           mesh), out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=0, static_argnames="row_loss_tokens")
    self.last_samples: list[dict[str, Any]] = []

  def _rows(self, units: Sequence[Sequence[Mapping[str, Any]]]):
    builder = sft_data.RowBuilder(self.tokenizer, **self.builder_args)
    rows, samples, skipped = [], [], 0
    for steps in units:
      steps = [self.resize(s) for s in steps] if self.resize else list(steps)
      try:
        row = builder.stepwise(steps[0]) if self.format == "stepwise" else builder.multiturn(steps)
        if len(row.tokens) > max(self.length_buckets):
          raise sft_data.UnusableReference(f"{len(row.tokens)} tokens, over the largest length bucket "
                                           f"{max(self.length_buckets)}")
      except (sft_data.UnusableReference, image_lib.ImageError, OSError) as e:
        skipped += 1
        logging.warning("SFT reference %r skipped: %s", steps[0].get("id"), e)
        continue
      rows.append(row)
      samples.append({
          "text": "\n".join(row.text),
          "id": steps[0].get("id"),
          "kind": "reference",
          "images": [builder.table[k].pil for k in row.images],
          "reference": sft_data.reference_turn(steps[-1], self.config.sft.think)
      })
    return rows, builder.table, samples, skipped

  def local_batch(self) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """This host's next batch of reference rows (empty rows in place of skipped references)."""
    for _ in range(10):
      rows, table, samples, skipped = self._rows(next(self.batches))
      if rows:
        break
    else:
      raise ValueError("10 SFT batches in a row had no usable reference: check sft.data and sft.length_buckets")
    batch = sft_data.collate(rows, table, num_rows=self.rows, num_devices=self.num_devices,
                             length_buckets=self.length_buckets, patch_buckets=self.config.rollout.patch_buckets,
                             vision_cfg=self.model_cfg.vision, max_image_patches=self.max_image_patches)
    return batch, samples, skipped

  def step(self, state, step_in_phase: int) -> tuple[Any, dict[str, float]]:
    """One supervised update; `step_in_phase` counts from 1."""
    start = time.perf_counter()
    local, self.last_samples, skipped = self.local_batch()
    built = time.perf_counter()
    tokens = float(local["attention_mask"].sum())
    row_slots = grpo.loss_slots(local["loss_mask"])  # each batch its own bucket
    batch = batch_placement.to_devices(local, self.mesh, self.model_cfg.vision)
    state, device_metrics = self._step(state, self._prepare(batch), row_loss_tokens=row_slots)
    metrics = {k: float(v) for k, v in sharding.to_host(device_metrics).items()}
    done = time.perf_counter()
    host = {
        "sft/skipped": float(skipped),
        "sft/tokens": tokens,
        "sft/sequence_length": tokens / max(int(local["attention_mask"].any(axis=1).sum()), 1)
    }
    metrics.update(sharding.host_mean(host))
    metrics.update({
        "sft/learning_rate": float(self.lr_fn(step_in_phase - 1)),
        "sft/loss_slots": float(row_slots),  # per row: the logits the update computes
        "sft/padded_length": float(batch["tokens"].shape[1]),  # the row length it computes
        "time/batch_s": built - start,
        "time/update_s": done - built,
        "time/step_s": done - start
    })
    return state, metrics

  def data_state(self) -> dict[str, Any]:
    return self.batches.get_state()

  def restore_data_state(self, state: Mapping[str, Any]) -> None:
    if state:
      self.batches.set_state(dict(state))
