"""The device programs of one training step, with abstract inputs at the recipe's shapes: what `varft.plan`
compiles.

Programs: `sampling_weights` (the train params cast and resharded to the sampler's layout), `encode_images` (every
sampler device encoding its own image table), `prefill` (each prompt once, P rows padded to the scheduler's prompt-
count bucket, copied into its G rows of the cache; the prompt images encoded inside it), `extend` (an observation
chunk of the largest chunk bucket on every row; with the code tool, one observation image per row when one fits the
chunk), `generate` (decode), `reference_logps`, `train_step`. The batches are `varft.batch.abstract` (rows
over the batch axes, one image table per batch device); the sampler programs take `Sampler`'s arguments in its
layouts on the rollout mesh, from the weights as `rollout_sharding.sampling_params` reshards them, tensor-parallel as
`rollout.tensor_parallel` resolves for the target accelerator's memory. Each program comes with the bytes that stay
resident while it runs (the train state and the reference weights during rollouts, the rest of the state and the
reference while the params are resharded, the reference weights during the update, the train state during the
reference pass).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np

from varft import batch as batch_lib
from varft import environment, grpo, rollout_sharding, run_config, sampling, scheduler, sharding, train
from varft.models.qwen25vl import model as qwen_model
from varft.processing import image as image_lib

PROGRAMS = ("sampling_weights", "encode_images", "prefill", "extend", "generate", "reference_logps", "train_step")


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
      micro_batches=config.grpo.micro_batches, row_loss_tokens=grpo.turn_loss_slots(r.max_new_tokens),
      patch_buckets=tuple(r.patch_buckets))


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
  return rollout_sharding.resolve_tensor_parallel(config.rollout.get("tensor_parallel", "auto"),
                                                  sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)),
                                                  local, memory_bytes)


def _sampler(config, model_cfg, rec: Recipe, mesh, params, tp: int):
  """The rollout's Sampler on its mesh (`rollout_sharding.rollout_mesh`, `tp`-way tensor parallel) and the sampling
  weights: `params` in the compute dtype in the layout `rollout_sharding.sampling_params` gives them."""
  dtype = jnp.dtype(model_cfg.dtype)
  weights = jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), params)
  rollout_mesh = rollout_sharding.rollout_mesh(mesh, tp)
  sampler_cfg = sampling.SamplingConfig(temperature=config.rollout.temperature, top_k=config.rollout.top_k,
                                        top_p=config.rollout.top_p, max_new_tokens=rec.new_tokens)
  stop = sampling.StopTable(np.zeros((model_cfg.text.vocab_size,), np.int32), np.zeros((4, 4), np.int32), ())
  sampler = sampling.Sampler(model_cfg, sampler_cfg, stop, mesh=rollout_mesh)
  return sampler, _abstract(weights, rollout_sharding.sampling_shardings(weights, rollout_mesh))


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
  reshard, _ = rollout_sharding.sampling_resharder(params, mesh, sampler.mesh, model_cfg.dtype)
  rec = dataclasses.replace(rec, prompts=rec.prompts // jax.process_count())  # each host samples its own prompts
  t, n = model_cfg.text, rec.rows
  sds = lambda shape, dt, *axes: jax.ShapeDtypeStruct(shape, dt, sharding=sampler.layout(shape, *axes))
  kv_shape = (t.num_layers, n, rec.cache_len, t.num_kv_heads, t.head_dim)
  cache = {
      "k": sds(kv_shape, model_cfg.dtype, 1, 3),
      "v": sds(kv_shape, model_cfg.dtype, 1, 3),
      "length": sds((n,), jnp.int32)
  }
  # The scheduler's next-token state: each row's last hidden state (`Sampler.empty_hidden`); decode computes the
  # logits from it step by step, and no (B, V) array is held between programs.
  state = sds((n, t.hidden_size), model_cfg.dtype)
  prompts = dataclasses.replace(rec, prompts=prefill_prompts(rec, sampler.num_shards), samples=1)
  prompt_chunk, images = _chunk_args(model_cfg, prompts, sampler.mesh, rec.prompt_len)
  # An observation image per row when the code tool (whose output is an image) is on and one fits the chunk; search
  # observations are text.
  code = bool(config.get("tools", {}).get("use_code", False))
  fits = code and rec.image_grid is not None and int(np.prod(rec.image_grid)) // 4 <= rec.chunk_len
  observation, observed = _chunk_args(model_cfg, dataclasses.replace(rec, prompts=n, samples=1), sampler.mesh,
                                      rec.chunk_len, fits)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  generate_args = (weights, cache, state, sds(
      (n,), jnp.int32), jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                             sharding=sharding.replicated(sampler.mesh)), sds(
                                                 (n,), jnp.int32), sds((n, rec.new_tokens), jnp.int32),
                   jnp.asarray(sampler.stop_table.token_bits), jnp.asarray(sampler.stop_table.pattern_bits))
  programs = {
      "sampling_weights": (reshard, (params,), {}),
      "prefill": (sampling._prefill_jit, (weights, cache, state, prompt_chunk, None, images, sds((n,), jnp.int32)), {
          "model_config": model_cfg
      }),
      "extend": (sampling._extend_jit, (weights, cache, observation, None, observed, state), {
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


def programs(config, model_cfg, rec: Recipe, mesh, tp: int):
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
