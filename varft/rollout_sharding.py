"""The rollout's devices and weights: the mesh the sampler runs on, its tensor-parallel degree, and the once-per-step
cast and reshard of the train params to the decode layout.

Rollouts run on `rollout_mesh`: every device of this host decodes its own rows, from weights replicated or
tensor-parallel within the host (`sampling_rules`: the run's rules without FSDP), which `sampling_params` reshards
from the train state's layout in one compiled program per step, a layer or a vocabulary block at a time.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from varft import sharding


def sampling_rules(rules: Sequence[tuple[str, Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """The sampler's parameter layout from `rules` (default: `sharding.current_rules()`): no FSDP (a decode step would
  gather every weight), tensor-parallel over `tensor` as the rules say."""
  rules = sharding.current_rules() if rules is None else rules
  return tuple((name, None if name == "embed" else axes) for name, axes in rules)


# `rollout.tensor_parallel = auto`: the sampling weights may take this fraction of a device's memory; the rest holds
# the resident train state (FSDP-sharded), the KV cache and the activations of the rollout programs.
AUTO_SAMPLING_FRACTION = 0.25


def sampling_tensor_parallel(param_bytes: int, devices: Sequence[jax.Device] | None = None, fraction: float = 0.5,
                             memory_bytes: int | None = None) -> int:
  """The smallest tensor-parallel degree (a power of two dividing this host's devices) at which the sampling
  weights take at most `fraction` of a device's memory (`memory_bytes`, default the platform's limit): 1 (a replica
  per device) when they fit, or when neither says how much memory a device has (CPU)."""
  devices = list(jax.local_devices() if devices is None else devices)
  limit = memory_bytes or (devices[0].memory_stats() or {}).get("bytes_limit")
  tp = 1
  while limit and param_bytes / tp > fraction * limit and len(devices) % (2 * tp) == 0:
    tp *= 2
  return tp


def resolve_tensor_parallel(setting: int | str, param_bytes: int, devices: Sequence[jax.Device] | None = None,
                            memory_bytes: int | None = None) -> int:
  """`rollout.tensor_parallel`: a positive degree as given, or `auto` (also 0): the least degree at which the
  sampling weights (`param_bytes` in the compute dtype) take at most `AUTO_SAMPLING_FRACTION` of a device's memory
  (`memory_bytes`: the planner's target accelerator; default the devices' own limit)."""
  if setting in ("auto", 0, "0"):
    return sampling_tensor_parallel(param_bytes, devices, AUTO_SAMPLING_FRACTION, memory_bytes)
  tp = int(setting) if str(setting).isdigit() else 0
  if tp < 1:
    raise ValueError(f"rollout.tensor_parallel={setting!r}: use auto or a positive number of devices")
  return tp


def rollout_mesh(mesh: Mesh, tensor_parallel: int = 1) -> Mesh:
  """The mesh rollouts run on: this host's devices of `mesh` (all of them on one host), in `mesh`'s device order,
  as (data = devices / tensor_parallel, fsdp = 1, tensor = tensor_parallel).

  Rows and the KV cache are split over every device (each decodes only its own rows); the weights are replicated
  (tensor_parallel = 1) or tensor-parallel within the host. Hosts hold different prompts, tool results and turn
  counts, so each samples on its own devices instead of running one lock-step program across hosts.
  """
  flat = list(mesh.devices.flat)
  mine = [d for d in flat if d.process_index == jax.process_index()]
  if len(mine) % tensor_parallel:
    raise ValueError(f"rollout tensor_parallel={tensor_parallel} does not divide this host's {len(mine)} devices")
  shape = (len(mine) // tensor_parallel, 1, tensor_parallel)
  return Mesh(
      np.asarray(mine, object).reshape(shape), sharding.MESH_AXES,
      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


def _global_sampling_mesh(mesh: Mesh, tensor_parallel: int) -> Mesh:
  """`mesh`'s devices in its own order (a jitted reshard keeps the device order) as (-1, 1, tensor_parallel); the
  tensor groups must lie within one host."""
  flat = np.asarray(list(mesh.devices.flat), object).reshape(-1, 1, tensor_parallel)
  if any(len({d.process_index for d in group.flat}) > 1 for group in flat.reshape(-1, tensor_parallel)):
    raise ValueError(f"rollout tensor_parallel={tensor_parallel}: the mesh's consecutive devices span hosts; use 1")
  return Mesh(flat, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))


# A vocabulary table (embed, lm_head) moves to the sampler's layout in this many pieces along the vocabulary.
VOCAB_PIECES = 16


def _piece_sharding(s, drop_axis: int | None) -> NamedSharding | None:
  """The layout of one piece in transit of a leaf laid out as `s`: one layer of a stacked leaf (`drop_axis=0`: its
  layout without that axis), or a block of a vocabulary table (same rank: the same layout). None: no mesh."""
  if not isinstance(s, NamedSharding):
    return None
  return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]) if drop_axis == 0 else s.spec)


def transit_pieces(tree: Any) -> tuple[tuple[int, int] | None, ...]:
  """Per leaf, how `sampling_params` moves it: (0, 0) one layer of the stacked `layers` axis at a time, (axis, n)
  `n` blocks of its vocabulary axis, None whole."""

  def pieces(path, x):
    axes = sharding.logical_axes(sharding.path_names(path), np.ndim(x))
    if axes[:1] == ("layers",):
      return (0, 0)
    if "vocab" in axes and np.shape(x)[axes.index("vocab")] % VOCAB_PIECES == 0:
      return (axes.index("vocab"), VOCAB_PIECES)
    return None

  return tuple(
      jax.tree.leaves(jax.tree_util.tree_map_with_path(pieces, tree),
                      is_leaf=lambda x: x is None or isinstance(x, tuple)))


@functools.lru_cache(maxsize=32)
def _resharder(dtype: str | None, treedef, in_shardings: tuple, out_shardings: tuple, pieces: tuple) -> Any:
  """One jitted cast + reshard per (dtype, tree, layouts): built once, so every later step reuses its program.

  Large leaves move in pieces (`transit_pieces`: a layer of a stacked weight, a block of a vocabulary table) with
  `lax.map`, so the reshard never holds more than one piece in transit (a layout change across dimensions may
  gather the whole operand); each piece is cast where its shards live before it moves, so the collectives carry
  compute-dtype bytes."""

  def cast(x, s):
    if dtype is None:
      return x
    x = x.astype(dtype)
    return x if s is None else jax.lax.with_sharding_constraint(x, s)

  def move(x, s_in, s_out, how):
    if how is None:
      return cast(x, _piece_sharding(s_in, None))
    axis, count = how
    in_piece = _piece_sharding(s_in, 0 if count == 0 else None)
    transit = NamedSharding(s_out.mesh, P(*tuple(s_out.spec)[1:])) if count == 0 else NamedSharding(s_out.mesh, P())
    one = lambda v: jax.lax.with_sharding_constraint(cast(v, in_piece), transit)
    if count == 0:
      return jax.lax.map(one, x)
    shape = x.shape
    blocks = jnp.moveaxis(x.reshape(shape[:axis] + (count, shape[axis] // count) + shape[axis + 1:]), axis, 0)
    return jnp.moveaxis(jax.lax.map(one, blocks), 0, axis).reshape(shape)

  def reshard(tree):
    leaves = map(move, jax.tree.leaves(tree), in_shardings, out_shardings, pieces)
    return jax.tree.unflatten(treedef, list(leaves))

  return jax.jit(reshard, out_shardings=jax.tree.unflatten(treedef, list(out_shardings)))


def sampling_shardings(params: Any, sampler_mesh: Mesh) -> Any:
  """The sampler's layout of `params` (`sampling_rules()`) on `sampler_mesh`, as a tree of NamedShardings."""
  return jax.tree.map(lambda s: NamedSharding(sampler_mesh, s),
                      sharding.tree_specs(params, sampler_mesh, sampling_rules()), is_leaf=lambda x: isinstance(x, P))


def sampling_resharder(params: Any, mesh: Mesh, sampler_mesh: Mesh, dtype=None) -> tuple[Any, Mesh]:
  """(the jitted program that casts and reshards `params` from `mesh` to the sampler's layout, the mesh it lays
  them out on): `sampler_mesh` on one host; with several, the global mesh of every host's sampler devices. Works on
  arrays and on abstract arrays with shardings (the planner compiles it)."""
  tp = sampler_mesh.shape["tensor"]
  target = sampler_mesh if jax.process_count() == 1 else _global_sampling_mesh(mesh, tp)
  fn = _resharder(None if dtype is None else np.dtype(dtype).name, jax.tree.structure(params),
                  tuple(x.sharding for x in jax.tree.leaves(params)),
                  tuple(jax.tree.leaves(sampling_shardings(params, target))), transit_pieces(params))
  return fn, target


def sampling_params(params: Any, mesh: Mesh, sampler_mesh: Mesh, dtype=None) -> Any:
  """The train state's `params` (sharded on `mesh`) in the sampler's layout on `sampler_mesh`, cast to `dtype`.

  One on-device program (compiled once, `sampling_resharder`) reshards them to `sampling_rules()` over the same
  devices; with several hosts each host then wraps its own devices' shards as arrays on its `sampler_mesh` (no
  host copy).
  """
  fn, target = sampling_resharder(params, mesh, sampler_mesh, dtype)
  out = fn(params)
  if target is sampler_mesh:
    return out
  local_devices = list(sampler_mesh.devices.flat)

  def wrap(x):
    by_device = {shard.device: shard.data for shard in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(sampler_mesh, x.sharding.spec),
                                                    [by_device[d] for d in local_devices])

  return jax.tree.map(wrap, out)


def rollout_inputs(params: Any, rng: jax.Array, mesh: Mesh, sampler_mesh: Mesh, dtype=None) -> tuple[Any, jax.Array]:
  """Parameters (`sampling_params`) and RNG key for sampling on `sampler_mesh`; with several hosts each host gets
  its own key."""
  params = sampling_params(params, mesh, sampler_mesh, dtype)
  return params, rng if jax.process_count() == 1 else jax.random.fold_in(rng, jax.process_index())
