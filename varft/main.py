"""varft entry point: train or evaluate one experiment config.

    python -m varft.main --config=experiments/search.py:demo --workdir=/tmp/run [--config.a.b=v ...]
    python -m varft.main --config=experiments/search.py:7b,multiturn --config.mode=eval --workdir=...

A user error (an unknown or mistyped key, a missing config file, a bad value, a part that is not installed) is one
line on stderr and exit code 2; the full config goes to `<workdir>/config.json`.
"""
from __future__ import annotations

import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. experiments/search.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, samples, predictions, exports.")
flags.DEFINE_enum(
    "action", "run", ["run", "check", "requirements"],
    "run: train or evaluate (config.mode); check: the start-up checks only, nothing loads; "
    "requirements: print the pip arguments of the optional parts the config needs, one install a line.")
flags.mark_flags_as_required(["config"])

# Loggers of libraries that print banners or per-step INFO lines: their warnings and errors stay.
_QUIET_LIBRARIES = ("orbax", "grain", "jax", "bm25s")
# TFDS warns that a freshly prepared local folder "has no dataset_info.json": only its errors are shown.
_ERRORS_ONLY = ("tensorflow_datasets",)


def _quiet_library_info(record) -> bool:
  """Drops library INFO lines (orbax per-save steps, TFDS 'Downloading and preparing' banners, grain, jax)."""

  def is_from(libraries):
    return any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in libraries)

  if is_from(_ERRORS_ONLY):
    return record.levelno >= std_logging.ERROR
  return record.levelno >= std_logging.WARNING or not is_from(_QUIET_LIBRARIES)


def user_error(message: str) -> None:
  """Exits with one line on stderr (exit code 2): the user's config or installation needs a change."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _override_error(message: str, argv: list[str]) -> str:
  """One line from ml_collections' AttributeError for an unknown `--config.a.b` key."""
  key = re.search(r"\\?'(\w+)\\?'", message)
  hint = re.search(r'Did you mean "(\w+)"', message)
  name = key.group(1) if key else "?"
  flag = next((a.split("=", 1)[0] for a in argv if re.search(rf"^--config\.(\w+\.)*{re.escape(name)}(=|$)", a)),
              f"--config.{name}")
  suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
  return f"{flag}: unknown config key {name!r}{suggestion}; every key is listed in varft/defaults.py"


def _config_file_error(message: str) -> str:
  """The last line of the traceback ml_collections wraps a failing config file in."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  head = lines[0].split(": Error whilst parsing config file")[0] if lines else "--config"
  return f"{head}: {lines[-1]}" if len(lines) > 1 else head


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every user error as one line and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS.config
    config.get("mode")  # a missing config file surfaces only on first access
  except AttributeError as e:
    user_error(_override_error(str(e), argv))
  except OSError:
    path = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else "--config"
    user_error(f"--config: no config file at {path!r}: run from the repo root or pass the file's path")
  except flags.Error as e:
    user_error(_config_file_error(str(e)))
  return rest


def main(argv):
  if len(argv) > 1:
    user_error(f"unexpected arguments {argv[1:]}: flags take the form --config.a.b=value")
  logging.get_absl_handler().addFilter(_quiet_library_info)
  config, workdir, action = flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.action
  from varft import checkpoint, preflight
  if action == "requirements":
    print("\n".join(preflight.requirements(config)))
    return
  if action == "run" and not workdir:
    user_error("--workdir is missing: every run writes into its own folder (--workdir=DIR)")
  try:
    if action == "check":
      from varft import run_config
      run_config.validate(config)
      print(f"ok: {preflight.describe(preflight.check(config))}")
    elif config.mode == "eval":
      from varft import evaluate
      evaluate.run(config, workdir)
    else:
      from varft import train
      train.train(config, workdir)
  except (preflight.ConfigError, checkpoint.RunFolderError) as e:
    user_error(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
