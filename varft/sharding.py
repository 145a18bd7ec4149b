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

Batches are sharded by rows over (`data`, `fsdp`) (`varft.batch`). Rollouts run on their own mesh, from weights
resharded to a decode layout once per step (`varft.rollout_sharding`).
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


def path_names(path) -> tuple[str, ...]:
  """The string keys of a pytree path (dict keys, dataclass fields): a parameter's path as `PARAM_AXES` names it."""
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
  return {path_names(path): axes for path, axes in leaves}


def logical_axes(names: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
  """Logical axes of a leaf whose trailing keys are a parameter's path (the parameter itself, its AdamW moments,
  its reference copy): the axes the model declares for it; None everywhere for any other leaf."""
  declared = _declared_axes()
  for start in range(len(names)):
    axes = declared.get(names[start:])
    if axes is not None:
      if len(axes) != ndim:
        raise ValueError(f"Parameter {'/'.join(names)} has {ndim} dims, its declared logical axes {axes} "
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
    return spec_for(logical_axes(path_names(path), len(shape)), shape, mesh, rules)

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
    axes = logical_axes(path_names(path), len(shape))
    rows.append(("/".join(path_names(path)), str(shape), str(axes), str(spec_for(axes, shape, mesh, rules))))
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  return "\n".join("  ".join([c.ljust(w) for c, w in zip(row, widths)] + [row[3]]) for row in rows)


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
