"""The device mesh, logical-axis rules -> PartitionSpecs, and the multi-host plumbing.

One mesh with axes (`data`, `fsdp`, `tensor`). Each model module declares its parameters' logical axes beside its
`init_params` (`PARAM_AXES`: `vocab`, `embed`, `heads`, `kv_heads`, `mlp`, `layers`); the rules,
`config.sharding.rules` (defaults: `DEFAULT_RULES`, made current for a run by `axis_rules`), map logical axes to mesh
axes. Activations name their axes too (`batch`, `length`, `act_embed`, `act_heads`, `act_mlp`, ...) at the layer
boundaries of both towers and at the loss (`constrain`), resolved by the same rules against the mesh being traced
(the abstract mesh of `jax.set_mesh` / `use_abstract_mesh`; no mesh: no constraint): rows stay on their device, so
on an fsdp mesh the only large collectives are weight all-gathers and gradient reduce-scatters (plus, in the loss,
the loss-slot hidden states gathered for vocabulary-parallel logits: `loss_batch`, `loss_vocab`). Any leaf of
another tree whose trailing keys form a parameter path (AdamW's `mu`/`nu`, the reference params) is sharded like
that parameter. A dimension that a mesh axis does not divide stays replicated, so small models run on any mesh.
`layout_table` is the resolved layout as text, for the start-up log.

Batches are sharded by rows over (`data`, `fsdp`) (`varft.batch`). Rollouts run on `rollout_mesh`: every device
decodes its own rows, from weights resharded to a decode layout once per step (`sampling_params`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
import contextvars
import functools
import json
import math
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from varft import defaults

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def rules_from_config(rules: Any) -> tuple[tuple[str, Any], ...]:
  """`config.sharding.rules` (logical axis -> a mesh axis, a sequence of them, None for replicated, or
  `unconstrained`: left to XLA), or (logical, mesh axes) pairs, as the pairs `spec_for` resolves."""
  pairs = rules.items() if hasattr(rules, "items") else rules
  out = []
  for name, axes in pairs:
    if axes == "unconstrained" or axes is P.UNCONSTRAINED:
      out.append((name, P.UNCONSTRAINED))
      continue
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    unknown = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in MESH_AXES]
    if unknown:
      raise ValueError(f"sharding.rules.{name}={axes!r}: {unknown} are not mesh axes; use {MESH_AXES}, None or "
                       "'unconstrained'")
    out.append((name, axes))
  return tuple(out)


# Logical axes -> mesh axes: the defaults of `config.sharding.rules` (varft.defaults).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = rules_from_config(defaults.sharding_config().rules)
_RULES: contextvars.ContextVar[tuple[tuple[str, Any], ...]] = contextvars.ContextVar("rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: Any):
  """Within the context every resolution without explicit rules (parameter and state layouts, activation
  constraints while a function is traced) uses `rules` (`config.sharding.rules`); a run is traced inside it."""
  token = _RULES.set(rules_from_config(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def current_rules() -> tuple[tuple[str, Any], ...]:
  """The rules of the innermost `axis_rules` context (DEFAULT_RULES outside any)."""
  return _RULES.get()


def initialize_distributed(enabled: str | bool = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> None:
  """`jax.distributed.initialize()` for multi-host runs (TPU pods, multi-node GPU, several CPU processes).

  `auto` initialises when the environment describes a cluster (TPU pod worker, SLURM, or the JAX_COORDINATOR_ADDRESS
  / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); explicit arguments override the environment.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if enabled == "auto":
    enabled = bool(coordinator_address) or "SLURM_JOB_ID" in env or "TPU_WORKER_HOSTNAMES" in env
  if not enabled:
    return
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed: process %d of %d, %d devices (%d local)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.local_device_count())


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) from a config mapping; one size may be -1 (= the remaining devices)."""
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(axes)}: sizes must be positive, with at most one -1 (the rest)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(axes)}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(axes)} needs {math.prod(sizes)} devices but {num_devices} are available")
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all devices (or `devices`) with Auto axis types (sharding propagates as in classic pjit)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(axes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _path_names(path) -> tuple[str, ...]:
  names = []
  for entry in path:
    key = getattr(entry, "key", getattr(entry, "name", None))
    if isinstance(key, str):
      names.append(key)
  return tuple(names)


@functools.cache
def _declared_axes() -> dict[tuple[str, ...], tuple[str | None, ...]]:
  """Every parameter path of the model -> the logical axes its module declares beside `init_params`."""
  from varft.models.qwen25vl import model  # here, not above: the model imports this module (activation constraints)
  leaves = jax.tree_util.tree_leaves_with_path(model.PARAM_AXES, is_leaf=lambda x: isinstance(x, tuple))
  return {_path_names(path): axes for path, axes in leaves}


def logical_axes(path_names: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
  """Logical axes of a leaf whose trailing keys are a parameter's path (the parameter itself, its AdamW moments,
  its reference copy): the axes the model declares for it; None everywhere for any other leaf."""
  declared = _declared_axes()
  for start in range(len(path_names)):
    axes = declared.get(path_names[start:])
    if axes is not None:
      if len(axes) != ndim:
        raise ValueError(f"Parameter {'/'.join(path_names)} has {ndim} dims, its declared logical axes {axes} "
                         f"{len(axes)}")
      return axes
  return (None,) * ndim


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] | None = None) -> P:
  """The PartitionSpec of logical `axes` by `rules` (default: `current_rules()`); dimensions that the mesh axes do
  not divide stay replicated."""
  rule = dict(current_rules() if rules is None else rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    mesh_axes = rule.get(name) if name else None
    if mesh_axes is P.UNCONSTRAINED:
      spec.append(P.UNCONSTRAINED)
      continue
    if isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    mesh_axes = tuple(a for a in (mesh_axes or ()) if mesh.shape.get(a, 1) > 1 and a not in used)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return P(*spec)


def constrain(x: jax.Array, axes: tuple[str | None, ...], rules: Sequence[tuple[str, Any]] | None = None) -> jax.Array:
  """`x` constrained to the sharding of its logical `axes` on the mesh being traced; unchanged without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(axes, tuple(x.shape), mesh, rules))


def constrain_params(tree: Any, rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """A parameter-shaped tree constrained to the parameters' shardings on the mesh being traced (e.g. a compute-
  dtype copy: cast shard by shard, so the layers all-gather the cast weights); unchanged without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return tree
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, tree_specs(tree, mesh, rules))


def tracing_mesh(mesh: Mesh | None):
  """A context that makes `mesh` the one `constrain` resolves against while a function is traced (usable inside
  `jax.jit`); a no-op context for None."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def tree_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  """PartitionSpecs for params, optimizer state or any tree whose leaves sit under parameter paths."""

  def leaf_spec(path, leaf):
    shape = tuple(np.shape(leaf))
    return spec_for(logical_axes(_path_names(path), len(shape)), shape, mesh, rules)

  return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> Any:
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def layout_table(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] | None = None) -> str:
  """The resolved layout of a parameter tree, one line per leaf: path, shape, logical axes, PartitionSpec (what
  the trainer logs at start)."""
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = tuple(np.shape(leaf))
    axes = logical_axes(_path_names(path), len(shape))
    rows.append(("/".join(_path_names(path)), str(shape), str(axes), str(spec_for(axes, shape, mesh, rules))))
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  return "\n".join("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[3]]) for row in rows)


def sampling_rules(rules: Sequence[tuple[str, Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """The sampler's parameter layout from `rules` (default: `current_rules()`): no FSDP (a decode step would gather
  every weight), tensor-parallel over `tensor` as the rules say."""
  rules = current_rules() if rules is None else rules
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
  return Mesh(np.asarray(mine, object).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _global_sampling_mesh(mesh: Mesh, tensor_parallel: int) -> Mesh:
  """`mesh`'s devices in its own order (a jitted reshard keeps the device order) as (-1, 1, tensor_parallel); the
  tensor groups must lie within one host."""
  flat = np.asarray(list(mesh.devices.flat), object).reshape(-1, 1, tensor_parallel)
  if any(len({d.process_index for d in group.flat}) > 1 for group in flat.reshape(-1, tensor_parallel)):
    raise ValueError(f"rollout tensor_parallel={tensor_parallel}: the mesh's consecutive devices span hosts; use 1")
  return Mesh(flat, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
    axes = logical_axes(_path_names(path), np.ndim(x))
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
  return jax.tree.map(lambda s: NamedSharding(sampler_mesh, s), tree_specs(params, sampler_mesh, sampling_rules()),
                      is_leaf=lambda x: isinstance(x, P))


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


def batch_size_multiple(mesh: Mesh) -> int:
  """Global batch rows must be a multiple of this (the devices along the batch axes)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def to_host(tree: Any) -> Any:
  """Fully replicated device values (e.g. metrics) as numpy on every host."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def host_mean(metrics: Mapping[str, float]) -> dict[str, float]:
  """The mean over hosts of host-side scalar metrics (rollout statistics, timings); identity on one host."""
  if jax.process_count() == 1 or not metrics:
    return {k: float(v) for k, v in metrics.items()}
  keys = sorted(metrics)
  values = np.asarray([float(metrics[k]) for k in keys], np.float64)
  gathered = multihost_utils.process_allgather(values)
  return dict(zip(keys, (float(v) for v in np.mean(gathered, axis=0))))


def gather_json(value: Any) -> list[Any]:
  """Every host's JSON-serialisable `value`, in process order (data positions, eval predictions)."""
  if jax.process_count() == 1:
    return [value]
  encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
  length = int(np.max(multihost_utils.process_allgather(np.asarray([len(encoded)]))))
  padded = np.zeros(length, np.uint8)
  padded[:len(encoded)] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, length)
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]


def is_writer() -> bool:
  """Only process 0 writes logs, sample rollouts and exports."""
  return jax.process_index() == 0
