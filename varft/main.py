"""varft entry point: train or evaluate one experiment config.

    python -m varft.main --config=experiments/search.py:demo --workdir=/tmp/run [--config.a.b=v ...]
    python -m varft.main --config=experiments/search.py:7b,multiturn --config.mode=eval --workdir=...
"""
from __future__ import annotations

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. experiments/search.py:demo.",
                                 lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, samples, predictions, exports.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax_info(record) -> bool:
  """orbax logs every step of every save at INFO; keep its warnings and errors on the console."""
  return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_orbax_info)
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  logging.info("Config:\n%s", config)
  if config.mode == "eval":
    from varft import evaluate
    evaluate.run(config, workdir)
  else:
    from varft import train
    train.train(config, workdir)


if __name__ == "__main__":
  app.run(main)
