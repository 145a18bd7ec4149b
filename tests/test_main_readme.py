"""The CLI's log filter, and the README's Python API example run as written on a tiny checkpoint."""
import logging
import os
import re

import numpy as np
from PIL import Image

from tests import hf_tiny
from varft import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(path, level):
  return logging.LogRecord("absl", level, path, 1, "msg", None, None)


def test_orbax_info_is_dropped_but_its_warnings_and_our_logs_stay():
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  assert not main._quiet_orbax_info(_record(orbax_file, logging.INFO))
  assert main._quiet_orbax_info(_record(orbax_file, logging.WARNING))
  assert main._quiet_orbax_info(_record(os.path.join("varft", "train.py"), logging.INFO))


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
  readme = open(os.path.join(REPO, "README.md")).read()
  api = readme.split("## Python API", 1)[1]
  example = re.search(r"```python\n(.*?)```", api, re.S).group(1)
  monkeypatch.chdir(tmp_path)
  hf_tiny.make_tiny_hf_checkpoint(str(tmp_path / "Qwen2.5-VL-3B-Instruct"))
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8)).save("cat.jpg")
  scope = {}
  exec(compile(example, "README.md", "exec"), scope)
  assert scope["logits"].shape[:2] == (1, len(scope["ids"]))
  assert np.isfinite(np.asarray(scope["logits"])).all()
  assert os.path.exists(tmp_path / "export" / "config.json")
