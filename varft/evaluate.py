"""Eval mode (`--config.mode=eval`): batched multi-turn evaluation of a checkpoint on the configured benchmarks.

Evaluates the latest checkpoint in the workdir (or `config.eval.checkpoint_step`; the initial weights, e.g.
`config.model.hf_dir`, when the workdir has none), writes each benchmark's predictions in the paper's JSON format
(`id, question, pred_answer, gt`, plus the trajectory) and its score table under `<workdir>/eval/step_<N>/`, and
prints the tables.
"""
from __future__ import annotations

import os

from absl import logging
import ml_collections

from varft import sharding, train


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates and returns the metrics (`eval/<benchmark>/f1`, `.../em`, ...)."""
  sharding.initialize_distributed(config.distributed)
  with sharding.axis_rules(config.sharding.rules):
    trainer = train.Trainer(config, workdir, training=False)
    try:
      step = None if config.eval.checkpoint_step < 0 else config.eval.checkpoint_step
      if not trainer.maybe_restore(step):
        logging.info("No checkpoint in %s: evaluating the initial weights", workdir)
      metrics = trainer.evaluate()
    finally:
      trainer.checkpointer.close()
  if sharding.is_writer():
    out_dir = os.path.join(workdir, "eval", f"step_{trainer.step:06d}")
    tables = [
        open(os.path.join(out_dir, name)).read() for name in sorted(os.listdir(out_dir)) if name.endswith("_scores.txt")
    ] if os.path.isdir(out_dir) else []
    print("\n".join(tables) if tables else "\n".join(f"{k}: {v:.4f}" for k, v in sorted(metrics.items())))
  return metrics
