"""The rollout batch across hosts and onto the devices: each host's rows and image tables padded to the shapes
every host agrees on (`merge_hosts`), then assembled into global arrays sharded over the mesh's batch axes
(`shard`); `to_devices` does both. The fields and their sharded axes are `varft.batch`'s.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import NamedSharding
import numpy as np

from varft import batch as batch_lib
from varft import sharding


def _pad_to(x: np.ndarray, axis: int, size: int, fill) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return np.pad(x, pad, constant_values=fill)


def pad_to_shapes(local: Mapping[str, Any], length: int, table: tuple[int, int, int] | None, num_devices: int,
                  vision_cfg=None) -> dict[str, Any]:
  """`local` with rows padded to `length` tokens and (when `table = (P, K, I)`) an image table of that size
  (rebuilt from `image_grid_thw`; an empty one when this host has no images)."""
  out = dict(local)
  for k in ("tokens", "attention_mask", "loss_mask", "sampler_logps", "image_index", "positions"):
    if k in out:
      out[k] = _pad_to(np.asarray(out[k]), out[k].ndim - 1, length, -1 if k == "image_index" else 0)
  if table is None:
    return out
  patches, blocks, max_images = table
  if "pixel_values" in out and out["pixel_values"].shape[1] == patches and \
      out["vision_inputs"]["full_key_blocks"].shape[-1] == blocks and out["image_grid_thw"].shape[1] == max_images:
    return out
  grids = out.get("image_grid_thw", np.zeros((num_devices, 0, 3), np.int32))
  pixel_values = out.get("pixel_values")
  per_device = []
  for d in range(num_devices):
    real = grids[d][np.prod(grids[d], axis=1) > 0]
    starts, _ = batch_lib.image_starts(real, vision_cfg)
    per_device.append([batch_lib.Image(pixel_values[d, s:s + int(np.prod(g))], g) for s, g in zip(starts, real)])
  out.update(batch_lib.image_tables(per_device, vision_cfg, patches, blocks, max_images))
  return out


def merge_hosts(local: Mapping[str, Any], num_devices: int, vision_cfg=None) -> dict[str, Any]:
  """This host's batch padded to the shapes every host agrees on (longest row bucket; largest image table), so
  that `shard` can assemble global arrays. Identity on one host; a collective (every host calls it) on several."""
  if jax.process_count() == 1:
    return dict(local)
  from jax.experimental import multihost_utils
  has = "pixel_values" in local
  mine = np.asarray([
      local["tokens"].shape[1], has, local["pixel_values"].shape[1] if has else 0,
      local["vision_inputs"]["full_key_blocks"].shape[-1] if has else 0, local["image_grid_thw"].shape[1] if has else 0
  ], np.int64)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 5)
  length, any_images = int(every[:, 0].max()), bool(every[:, 1].any())
  table = tuple(int(every[:, i].max()) for i in (2, 3, 4)) if any_images else None
  return pad_to_shapes(local, length, table, num_devices, vision_cfg)


def shardings(batch: Mapping[str, Any], mesh) -> dict[str, Any]:
  """NamedShardings of every device field of `batch` (host fields are left out)."""
  return {
      k: jax.tree.map(lambda _, k=k: NamedSharding(mesh, batch_lib.spec(k)), v)
      for k, v in batch.items()
      if k not in batch_lib.FIELDS or batch_lib.FIELDS[k].kind != batch_lib.HOST
  }


def devices_per_host(mesh) -> int:
  """Devices along the batch axes holding this host's rows: the number of image tables a host builds."""
  return sharding.batch_size_multiple(mesh) // jax.process_count()


def shard(local_batch: Mapping[str, Any], mesh) -> dict[str, Any]:
  """Global device arrays from this host's rows and tables (host fields dropped): each host supplies its share of
  every sharded axis, which must be the same shape on every host (see `merge_hosts`)."""
  multiple = sharding.batch_size_multiple(mesh)
  out = {}
  for key, value in shardings(local_batch, mesh).items():

    def put(x, s):
      x = np.asarray(x)
      axis = s.spec.index(sharding.BATCH_AXES)
      total = x.shape[axis] * jax.process_count()
      if total % multiple:
        raise ValueError(
            f"The batch has {total} rows (or image tables) in {key!r}, not a multiple of the "  # noqa: B023
            f"{multiple} devices of the mesh's {sharding.BATCH_AXES} axes: change the batch size or "
            "the mesh.")
      return jax.make_array_from_process_local_data(s, x, x.shape[:axis] + (total,) + x.shape[axis + 1:])

    out[key] = jax.tree.map(put, local_batch[key], value)
  return out


def to_devices(local_batch: Mapping[str, Any], mesh, vision_cfg=None) -> dict[str, Any]:
  """`merge_hosts` then `shard`: this host's rollout batch as the global training batch."""
  return shard(merge_hosts(local_batch, devices_per_host(mesh), vision_cfg), mesh)
