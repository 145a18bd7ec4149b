"""The training batch: one schema for what the rollout (and the echo task) builds, what the trainer merges across
hosts and shards (`varft.batch_placement`), what grpo splits into micro-batches and consumes.

A batch is a flat dict of arrays (`vision_inputs` is a dict of arrays). Its fields come in three kinds:

* **per row** (`ROW`): one row per trajectory; the row axis (N) is sharded over the mesh's batch axes
  (`data`, `fsdp`), so device d holds rows [d N/D, (d+1) N/D).
* **per device** (`DEVICE`): the image table. Its leading axis D is the number of devices along the batch axes and
  is sharded exactly like the rows, so table d sits on the device that holds the rows using it. Each device's table
  holds the distinct images of its own rows (a prompt's G rows usually share one device, so its image is there
  once), each image on its own attention blocks (`image_starts`), padded to a static patch bucket P; each device
  encodes only its own table, and full attention spans K key blocks (`key_blocks`): one image's, never more.
  `image_index` of a row indexes its own device's merged image cells.
* **per image, host only** (`HOST`): `image_grid_thw`, each device's image grids; used to rebuild a table when
  hosts agree on larger shapes, never sent to the devices.

Shapes: L a length bucket, P a patch bucket per device, M = P / merge**2 merged cells, nb = ceil(P / block)
attention blocks, K key blocks, I images per device (padded with zero grids). The rollout fields are built by
`assemble`; `varft.grpo.prepare_batch` adds the `TRAIN` fields; `abstract` gives every field's shape for a planned
configuration without building anything.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from varft import sharding

ROW, DEVICE, HOST = "row", "device", "host"


@dataclasses.dataclass(frozen=True)
class Field:
  kind: str  # ROW, DEVICE or HOST
  dtype: Any
  dims: tuple[str, ...]  # symbolic shape; N (rows) or D (devices) is the sharded axis
  doc: str

  @property
  def sharded_axis(self) -> int:
    return self.dims.index("N" if self.kind == ROW else "D")


_I32, _F32 = np.dtype(np.int32), np.dtype(np.float32)
FIELDS: dict[str, Field] = {
    "tokens": Field(ROW, _I32, ("N", "L"), "token ids, right-padded with 0"),
    "attention_mask": Field(ROW, _I32, ("N", "L"), "1 on real tokens (a prefix of the row)"),
    "positions": Field(ROW, _I32, ("3", "N", "L"), "M-RoPE (t, h, w) positions; rows on axis 1"),
    "loss_mask": Field(ROW, _F32, ("N", "L"), "1 where the policy sampled the token (not prompt/tool/padding)"),
    "sampler_logps": Field(ROW, _F32, ("N", "L"), "the sampler's log-prob of each sampled token, 0 elsewhere"),
    "image_index": Field(ROW, _I32, ("N", "L"), "merged image cell in this row's device table, -1 for text"),
    "group_ids": Field(ROW, _I32, ("N",), "the row's prompt, 0..prompts-1 on each host (the trainer makes them "
                       "global)"),
    "rewards": Field(ROW, _F32, ("N",), "total reward (added by the trainer)"),
    "pixel_values": Field(DEVICE, _F32, ("D", "P", "patch_dim"), "each device's image patches, zero-padded"),
    "vision_inputs": Field(DEVICE, _I32, ("D", "..."), "each device's `vision.vision_inputs` (see VISION_INPUTS)"),
    "image_grid_thw": Field(HOST, _I32, ("D", "I", "3"), "each device's image grids, zero rows pad"),
}
# What `grpo.prepare_batch` adds (per row); `ref_logps` only with a KL term, `is_weights` only with tis_cap > 0.
TRAIN_FIELDS: dict[str, Field] = {
    "advantages": Field(ROW, _F32, ("N",), "group-relative advantage"),
    "loss_weights": Field(ROW, _F32, ("N", "L"), "per-token weight of the aggregated loss (sums over the batch)"),
    "old_logps": Field(ROW, _F32, ("N", "L"), "log-probs of the ratio's denominator, 0 off the loss mask"),
    "ref_logps": Field(ROW, _F32, ("N", "L"), "the frozen reference policy's log-probs"),
    "is_weights": Field(ROW, _F32, ("N", "L"), "truncated importance weights sampler -> trainer"),
}
# `vision_inputs` entries (each with a leading D).
VISION_INPUTS = {
    "window_order": ("M",),
    "window_inverse": ("M",),
    "window_segment": ("P",),
    "full_segment": ("P",),
    "rotary_ids": ("P", "2"),
    "full_key_blocks": ("nb", "K")
}
ROLLOUT_KEYS = tuple(k for k, f in FIELDS.items() if f.kind == ROW and k != "rewards")
ROW_KEYS = tuple(k for k, f in {**FIELDS, **TRAIN_FIELDS}.items() if f.kind == ROW)
# What the model reads of a batch (the rest of the rollout fields feed advantages and old log-probs).
MODEL_INPUTS = ("tokens", "attention_mask", "positions", "loss_mask", "image_index", "pixel_values", "vision_inputs")


def spec(name: str) -> P:
  """The PartitionSpec of a batch field: its sharded axis (rows or devices) over the batch axes."""
  field = FIELDS.get(name) or TRAIN_FIELDS.get(name)
  return P(*[None] * (0 if field is None else field.sharded_axis), sharding.BATCH_AXES)


class Row(NamedTuple):
  """One trajectory as the rollout hands it over (per token lists of equal length n)."""
  group: int
  tokens: Sequence[int]
  positions: np.ndarray  # (3, n)
  loss_mask: Sequence[float]
  sampler_logps: Sequence[float]
  image_key: Sequence[str | None]  # which image each token shows (None for text)
  image_local: Sequence[int]  # that image's merged cell (-1 for text)


class Image(NamedTuple):
  patches: np.ndarray  # (p, patch_dim) float32, the processor's order
  grid: np.ndarray  # (3,) (t, h, w) in patches


def image_starts(grids: Sequence[Any], vision_cfg) -> tuple[list[int], int]:
  """The first patch of each image in a device's table, each on an attention-block boundary (the images' order),
  and the patches the table needs. A block of full attention then holds one image only, so it visits that image's
  blocks only: full attention is per image, however many images a device holds."""
  from varft.models.qwen25vl import vision
  block = vision.block_patches(vision_cfg)
  starts, end = [], 0
  for grid in grids:
    end = -(-end // block) * block
    starts.append(end)
    end += int(np.prod(grid))
  return starts, end


def key_blocks(num_patches: int, max_image_patches: int, vision_cfg) -> int:
  """Static key blocks per query block in full attention: the blocks of the largest image (`image_starts` puts
  each image on its own blocks), never more than the table's."""
  from varft.models.qwen25vl import vision
  block = vision.block_patches(vision_cfg)
  return max(min(-(-max_image_patches // block), -(-num_patches // block)), 1)


def _table_grids(grids: Sequence[Any], starts: Sequence[int], merge: int) -> np.ndarray:
  """`grids` with a filler image (1, merge, gap / merge) in each gap between images: zero patches in their own
  attention segment, never looked up."""
  out, end = [], 0
  for grid, start in zip(grids, starts):
    if start > end:
      out.append((1, merge, (start - end) // merge))
    out.append(tuple(int(x) for x in grid))
    end = start + int(np.prod(grid))
  return np.asarray(out, np.int64).reshape(-1, 3)


def image_tables(per_device: Sequence[Sequence[Image]], vision_cfg, num_patches: int, num_key_blocks: int,
                 max_images: int | None = None) -> dict[str, Any]:
  """The DEVICE and HOST fields for each device's list of images: patches at `image_starts`, zero-padded to
  `num_patches`, their vision index arrays, and their grids padded to `max_images` rows."""
  from varft.models.qwen25vl import vision
  patch_dim = vision_cfg.patch_dim
  max_images = max([len(images) for images in per_device] + [max_images or 1])
  pixel_values = np.zeros((len(per_device), num_patches, patch_dim), np.float32)
  grids = np.zeros((len(per_device), max_images, 3), np.int32)
  inputs = []
  for d, images in enumerate(per_device):
    starts, total = image_starts([im.grid for im in images], vision_cfg)
    if total > num_patches:
      raise ValueError(f"device {d}'s images need {total} patches, more than the table's {num_patches}")
    for im, start in zip(images, starts):
      pixel_values[d, start:start + len(im.patches)] = im.patches
    grids[d, :len(images)] = np.asarray([im.grid for im in images], np.int32).reshape(-1, 3)
    table_grids = _table_grids(grids[d, :len(images)], starts, vision_cfg.spatial_merge_size)
    inputs.append(vision.vision_inputs(table_grids, vision_cfg, num_patches, num_key_blocks))
  return {
      "pixel_values": pixel_values,
      "vision_inputs": {
          k: np.stack([x[k] for x in inputs]) for k in inputs[0]
      },
      "image_grid_thw": grids
  }


def device_images(rows: Sequence[Row], images: Mapping[str, Image], num_devices: int,
                  vision_cfg) -> tuple[list[list[Image]], np.ndarray]:
  """Each device's distinct images (in order of first use by its rows) and every row's `image_index` into its own
  device's table (rows (N, L) are taken from `Row.image_key` / `image_local`, L = the longest row)."""
  unit = vision_cfg.spatial_merge_size ** 2
  per_row = len(rows) // num_devices
  length = max([len(r.tokens) for r in rows] + [1])
  index = np.full((len(rows), length), -1, np.int32)
  tables = []
  for d in range(num_devices):
    mine = rows[d * per_row:(d + 1) * per_row]
    keys = list(dict.fromkeys(k for r in mine for k in r.image_key if k is not None))
    starts, _ = image_starts([images[k].grid for k in keys], vision_cfg)
    offsets = {k: start // unit for k, start in zip(keys, starts)}
    for b, r in enumerate(mine, d * per_row):
      index[b, :len(r.tokens)] = [-1 if k is None else offsets[k] + i for k, i in zip(r.image_key, r.image_local)]
    tables.append([images[k] for k in keys])
  return tables, index


def table_patches(per_device: Sequence[Sequence[Image]], vision_cfg) -> int:
  """The patches the largest of these device tables needs (see `image_starts`)."""
  return max(image_starts([im.grid for im in images], vision_cfg)[1] for images in per_device)


def assemble(rows: Sequence[Row], images: Mapping[str, Image], *, num_rows: int, num_samples: int, num_devices: int,
             length: int, vision_cfg=None, patch_buckets: Sequence[int] = (),
             max_image_patches: int = 0) -> dict[str, Any]:
  """The rollout batch (numpy) of `rows`, padded with empty rows (no loss, their own groups) to `num_rows`, rows
  split over `num_devices` devices in order, each device's images in its own table (absent when no row shows an
  image). `length` is the (bucketed) row length; the patch bucket is the smallest of `patch_buckets` holding every
  device's images (beyond the largest: a multiple of it)."""
  if num_rows < len(rows) or num_rows % num_devices:
    raise ValueError(f"{len(rows)} rows cannot be padded to {num_rows} rows over {num_devices} devices: the rows "
                     "per host (prompts_per_host x num_samples) must be a multiple of the batch devices per host")
  if max((len(r.tokens) for r in rows), default=0) > length:
    raise ValueError(f"a row of {max(len(r.tokens) for r in rows)} tokens does not fit the length {length}")
  empty = [Row(g // num_samples, [], np.zeros((3, 0), np.int32), [], [], [], []) for g in range(len(rows), num_rows)]
  rows = list(rows) + empty
  batch = {
      k: np.zeros((num_rows, length), FIELDS[k].dtype)
      for k in ("tokens", "attention_mask", "loss_mask", "sampler_logps")
  }
  batch["positions"] = np.zeros((3, num_rows, length), np.int32)
  batch["group_ids"] = np.asarray([r.group for r in rows], np.int32)
  for b, r in enumerate(rows):
    m = len(r.tokens)
    batch["tokens"][b, :m] = r.tokens
    batch["attention_mask"][b, :m] = 1
    batch["positions"][:, b, :m] = r.positions
    batch["loss_mask"][b, :m] = r.loss_mask
    batch["sampler_logps"][b, :m] = r.sampler_logps
  batch["image_index"] = np.full((num_rows, length), -1, np.int32)
  if not any(k is not None for r in rows for k in r.image_key):
    return batch
  tables, index = device_images(rows, images, num_devices, vision_cfg)
  batch["image_index"][:, :index.shape[1]] = index
  from varft import sampling
  patches = sampling.bucket(table_patches(tables, vision_cfg), patch_buckets, beyond="multiple")
  batch.update(image_tables(tables, vision_cfg, patches, key_blocks(patches, max_image_patches, vision_cfg)))
  return batch


# ---- on the device ----------------------------------------------------------------------------------------------


def num_tables(batch: Mapping[str, Any]) -> int:
  """D of the batch's image table (0 without images)."""
  pixel_values = batch.get("pixel_values")
  return 0 if pixel_values is None or pixel_values.shape[1] == 0 else pixel_values.shape[0]


def split_micro(batch: Mapping[str, Any], m: int) -> dict[str, Any]:
  """Row fields reshaped to (m, N/m, ...): micro-batch i holds rows i, i+m, ... of every device's block, so each
  micro-batch keeps the row-sharded layout and its rows still find their images in their own device's table."""
  n = batch["tokens"].shape[0]
  devices = max(num_tables(batch), 1)
  if n % (m * devices):
    raise ValueError(f"{n} rows cannot be split into {m} micro-batches over {devices} image tables: the rows per "
                     "device must be a multiple of grpo.micro_batches")

  def split(x, axis):
    shape = x.shape[:axis] + (x.shape[axis] // m, m) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis + 1, 0)

  fields = {**FIELDS, **TRAIN_FIELDS}
  return {k: split(v, fields[k].sharded_axis) for k, v in batch.items() if k in ROW_KEYS}


def encode_tables(encode, pixel_values: jnp.ndarray, vision_inputs: Mapping[str, Any]) -> jnp.ndarray:
  """`encode(pixel_values (P, pd), vision_inputs) -> (M, E)` applied to each device's table: (D, M, E). The D axis
  is sharded like the rows, so each device encodes only its own table (the compiled program holds (1, P, pd))."""
  return jax.vmap(encode)(pixel_values, dict(vision_inputs))


def lookup_images(image_embeds: jnp.ndarray, image_index: jnp.ndarray) -> jnp.ndarray:
  """Rows (N, L, E) of each row's own device table `image_embeds` (D, M, E) at `image_index` (N, L) (-1: zeros):
  rows [d N/D, (d+1) N/D) read table d only (a batched gather, local to each device)."""
  devices, cells, width = image_embeds.shape
  n, length = image_index.shape
  index = jnp.maximum(image_index, 0).reshape(devices, (n // devices) * length)
  rows = jax.vmap(lambda table, i: jnp.take(table, i, axis=0, mode="clip"))(image_embeds, index)
  rows = rows.reshape(n, length, width)
  return jnp.where((image_index >= 0)[..., None], rows, jnp.zeros((), rows.dtype))


# ---- for the planner ----------------------------------------------------------------------------------------------


def abstract(num_rows: int, length: int, *, stage: str = "train", num_devices: int = 1, vision_cfg=None,
             patches_per_device: int = 0, max_image_patches: int = 0, max_images: int = 1, kl: bool = True,
             importance_weights: bool = False, mesh=None) -> dict[str, Any]:
  """The batch as `jax.ShapeDtypeStruct`s (with shardings when `mesh` is given), without building anything.

  `stage='rollout'`: what the trainer puts on the devices (`batch_placement.to_devices`: the rollout fields and
  `rewards`); `stage='train'`: what the train step consumes (`grpo.prepare_batch`'s output; `ref_logps` when `kl`,
  `is_weights` when `importance_weights`). An image table of `patches_per_device` patches on each of `num_devices`
  (the mesh's batch devices) when `vision_cfg` is given and `patches_per_device > 0`; `max_image_patches` sizes its
  key blocks (default: the whole table).
  """
  if stage not in ("rollout", "train"):
    raise ValueError(f"stage {stage!r} is not 'rollout' or 'train'")
  dims = {"N": num_rows, "L": length, "3": 3}
  if stage == "rollout":
    names = ROLLOUT_KEYS + ("rewards",)
  else:
    names = (MODEL_INPUTS[:5] + ("advantages", "loss_weights", "old_logps") + ("ref_logps",) * kl +
             ("is_weights",) * importance_weights)
  fields = {**FIELDS, **TRAIN_FIELDS}
  out: dict[str, Any] = {k: tuple(dims[d] for d in fields[k].dims) for k in names}
  if vision_cfg is not None and patches_per_device > 0:
    from varft.models.qwen25vl import vision
    unit = vision_cfg.spatial_merge_size ** 2
    if patches_per_device % unit:
      raise ValueError(f"patches_per_device={patches_per_device} must be a multiple of {unit}")
    blocks = key_blocks(patches_per_device, max_image_patches or patches_per_device, vision_cfg)
    sizes = {
        "D": num_devices,
        "P": patches_per_device,
        "M": patches_per_device // unit,
        "2": 2,
        "K": blocks,
        "nb": -(-patches_per_device // vision.block_patches(vision_cfg)),
        "patch_dim": vision_cfg.patch_dim
    }
    out["pixel_values"] = tuple(sizes[d] for d in FIELDS["pixel_values"].dims)
    out["vision_inputs"] = {k: (num_devices,) + tuple(sizes[d] for d in v) for k, v in VISION_INPUTS.items()}
  dtype = lambda k: fields[k].dtype

  def struct(k, shape):
    s = None if mesh is None else NamedSharding(mesh, spec(k))
    return jax.ShapeDtypeStruct(shape, dtype(k), sharding=s)

  return {
      k: ({
          kk: struct(k, vv) for kk, vv in v.items()
      } if isinstance(v, dict) else struct(k, v)) for k, v in out.items()
  }
