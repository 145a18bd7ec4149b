"""Every Python block and command of the README, run as written.

Python blocks run in a folder holding the files they name (a tiny checkpoint, an image, a corpus). Commands run
with the README's placeholder paths (/data/MAT, /ckpt/..., /runs/...) mapped to a demo data folder and a tiny
checkpoint, the training commands shrunk to one small step by appended overrides, the launch scripts with
`--dry-run`. The quick-start and test commands are `.ci/run`'s own, checked verbatim.
"""
import json
import logging
import os
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import hf_tiny
from varft import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md")).read()
# Appended to the README's training commands: one small step on the tiny checkpoint.
SMALL_RUN = [
    "--config.total_steps=1", "--config.rollout.prompts_per_host=1", "--config.rollout.num_samples=2",
    "--config.grpo.micro_batches=1", "--config.rollout.max_new_tokens=8", "--config.rollout.max_turns=2",
    "--config.rollout.max_total_tokens=1024", "--config.rollout.length_buckets=(1024,)",
    "--config.rollout.chunk_buckets=(128,)", "--config.rollout.patch_buckets=(1024,)",
    "--config.rollout.image_max_pixels=50176", "--config.data.resize=224", "--config.eval_every=0",
    "--config.samples_every=0", "--config.export_hf=False", "--config.eval.num_prompts=2", "--config.eval.batch_size=2",
    "--config.eval.max_turns=1", "--config.model.dtype=float32"
]


def blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands():
  """The README's shell commands, continuation lines joined."""
  for block in blocks("bash"):
    yield from (c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip())


def _record(path, level):
  return logging.LogRecord("absl", level, path, 1, "msg", None, None)


def test_library_info_is_dropped_but_warnings_and_our_logs_stay():
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  tfds_file = os.path.join("site-packages", "tensorflow_datasets", "core", "file_utils.py")
  assert not main._quiet_library_info(_record(orbax_file, logging.INFO))
  assert main._quiet_library_info(_record(orbax_file, logging.WARNING))
  assert not main._quiet_library_info(_record(tfds_file, logging.WARNING))
  assert main._quiet_library_info(_record(os.path.join("varft", "train.py"), logging.INFO))


def test_ci_runs_the_quick_start_and_test_commands_verbatim():
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  quick_start, tests = blocks("bash")[:2]
  for line in (quick_start.strip(), tests.strip()):
    pip, run = line.split(" && ")
    assert pip in ci and run.split(" --workdir=")[0] in ci, line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The files the README's examples name, in one folder."""
  root = tmp_path_factory.mktemp("readme")
  hf_tiny.make_tiny_hf_checkpoint(str(root / "Qwen2.5-VL-3B-Instruct"))
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)).save(root / "cat.jpg")
  docs = [{
      "id": "1",
      "title": "Burkina Faso",
      "text": "Ouagadougou is the capital of Burkina Faso."
  }, {
      "id": "2",
      "title": "LEGO",
      "text": "LEGO was founded in Billund in 1932."
  }]
  (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  return root


def test_python_blocks_run_as_written(files, monkeypatch):
  monkeypatch.chdir(files)
  api, tools, reward = blocks("python")
  scope = {}
  exec(compile(api, "README.md", "exec"), scope)
  assert scope["logits"].shape[:2] == (1, len(scope["ids"])) and np.isfinite(np.asarray(scope["logits"])).all()
  assert os.path.exists(files / "export" / "config.json")
  scope = {}
  exec(compile(tools, "README.md", "exec"), scope)
  search, code = scope["observations"]
  assert search.ok and "Ouagadougou" in search.text
  assert code.ok, code.error
  rotated = np.asarray(Image.open(files / "cat.jpg").convert("RGB").rotate(180))
  assert code.image.size == (120, 90) and np.abs(np.asarray(code.image, np.int16) - rotated).mean() < 8  # JPEG
  scope = {}
  exec(compile(reward, "README.md", "exec"), scope)
  assert scope["total"].shape == (2,) and scope["total"][0] == pytest.approx(2.0)  # exact answer, right format
  assert set(scope["components"]) == {"accuracy", "format"}


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
  """The README's placeholder paths -> real folders: demo data, a tiny checkpoint, run folders."""
  from varft.data import demo
  root = tmp_path_factory.mktemp("paths")
  layout = demo.layout(str(root / "demo"))
  demo.generate(str(root / "demo"), seed=0)
  tiny = str(root / "ckpt")
  hf_tiny.make_tiny_hf_checkpoint(tiny)
  return {
      "/data/MAT": layout["mat_dir"],
      "/data/tfds": str(root / "tfds"),
      "/data/wiki.jsonl": layout["corpus"],
      "/ckpt/Qwen2.5-VL-7B-Instruct": tiny,
      "/ckpt/Qwen2.5-VL-3B-Instruct": tiny,
      "/runs/": f"{root}/runs/",
      "/tmp/run": str(root / "run"),
      "/shared/run": str(root / "shared_run"),
      "scores.json": str(root / "s.json")
  }


def _full_benchmark_predictions(runs):
  """MAT-Search scoring needs its 150 items in order: the eval's demo predictions (a few items) repeated to 150, in
  the file layout the eval wrote; returns the name of the step folder holding it."""
  step = sorted(os.listdir(os.path.join(runs, "search7b", "eval")))[-1]
  path = os.path.join(runs, "search7b", "eval", step, "mat_search.json")
  items = json.load(open(path))
  full = [dict(items[i % len(items)], id=str(i)) for i in range(150)]
  folder = os.path.join(runs, "search7b", "eval", "full")
  os.makedirs(folder, exist_ok=True)
  json.dump(full, open(os.path.join(folder, "mat_search.json"), "w"))
  return "full"


def _run(command, placeholders):
  for placeholder, path in placeholders.items():
    command = command.replace(placeholder, path)
  argv = shlex.split(command)
  if argv[0] == "python":
    argv[0] = sys.executable
    if argv[2] == "varft.main":
      argv += SMALL_RUN
  elif argv[0].startswith("launch/"):
    argv += ["--dry-run"]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             PATH=f"{os.path.dirname(sys.executable)}:" + os.environ["PATH"])
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_commands_run_as_written(placeholders):
  ran = 0
  for command in list(commands())[2:]:
    if command.startswith("python -m varft.eval.score"):
      command = command.replace("step_001600", _full_benchmark_predictions(placeholders["/runs/"]))
    out = _run(command, placeholders)
    assert out.returncode == 0, f"{command}\n{out.stderr[-4000:]}"
    ran += 1
  scores = json.load(open(placeholders["scores.json"]))
  assert "all" in json.dumps(scores)
  assert ran == 9
