"""Eval mode (`--config.mode=eval`): batched multi-turn evaluation of a checkpoint on the configured benchmarks.

Evaluates the latest checkpoint in the workdir (or `config.eval.checkpoint_step`; the initial weights, e.g.
`config.model.hf_dir`, when the workdir has none), writes each benchmark's predictions in the paper's JSON format
(`id, question, pred_answer, gt`, plus the trajectory) and its score table under `<workdir>/eval/step_<N>/`, and
prints the tables. It builds only the parameters and the task: no optimizer state, no training data, no workdir
lock (a running run's checkpoints can be evaluated beside it).
"""
from __future__ import annotations

import os

from absl import logging
import ml_collections
import orbax.checkpoint as ocp

from varft import checkpoint as ckpt_lib
from varft import environment, preflight, run_config, sharding, train


def restore_params(directory: str, params, step: int | None) -> tuple[int, object] | None:
  """(step, params) of the latest (or the given) complete checkpoint under `directory`, read alone from its train
  state (the optimizer moments stay on disk), in the layout of `params`; None when there is none."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=(ckpt_lib.STATE,))
  try:
    if step is None:
      step = manager.latest_step()
      if step is None:
        return None
    elif step not in manager.all_steps():
      raise FileNotFoundError(f"No checkpoint in {directory} to restore step {step} from")
    abstract = {"params": ckpt_lib.abstract_like(params)}
    state = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                   partial_restore=True)
    return step, manager.restore(step, args=ocp.args.Composite(**{ckpt_lib.STATE: state}))[ckpt_lib.STATE]["params"]
  finally:
    manager.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates and returns the metrics (`eval/<benchmark>/f1`, `.../em`, ...)."""
  sharding.initialize_distributed(config.distributed)
  with sharding.axis_rules(config.sharding.rules):  # every layout and activation constraint
    run_config.validate(config)
    preflight.check(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    model_cfg = train.model_config(config)
    task = environment.get(config.task).build(config, model_cfg, mesh, workdir)
    try:
      params = train.load_params(config, model_cfg, mesh)
      wanted = None if config.eval.checkpoint_step < 0 else config.eval.checkpoint_step
      restored = restore_params(os.path.join(workdir, "checkpoints"), params, wanted)
      step = 0
      if restored is None:
        logging.info("No checkpoint in %s: evaluating the initial weights", workdir)
      else:
        step, params = restored
      metrics = train.evaluate(task, config, workdir, params, step)
    finally:
      task.close()
  if sharding.is_writer():
    out_dir = os.path.join(workdir, "eval", f"step_{step:06d}")
    tables = [
        open(os.path.join(out_dir, name)).read() for name in sorted(os.listdir(out_dir)) if name.endswith("_scores.txt")
    ] if os.path.isdir(out_dir) else []
    print("\n".join(tables) if tables else "\n".join(f"{k}: {v:.4f}" for k, v in sorted(metrics.items())))
  return metrics
