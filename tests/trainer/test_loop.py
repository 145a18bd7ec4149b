"""The training loop end to end on the echo task: learning, kill -9 + resume, config validation, run outputs."""
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import echo
from varft import evaluate, metrics_writer, run_config, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_policy_learns_to_repeat_the_shown_token(tmp_path):
  config = echo.get_config()
  config.total_steps = 120
  config.optim.learning_rate = 1e-2
  config.checkpoint_every = 0
  config.eval_every = 0
  train.train(config, str(tmp_path))
  rewards = [row["reward/mean"] for row in metrics_writer.read_metrics(str(tmp_path))]
  assert len(rewards) == 120
  assert rewards[0] <= 0.3, rewards[:5]
  assert sum(rewards[-10:]) / 10 >= 0.8, rewards[-10:]
  html = (tmp_path / "samples" / "step_000120.html").read_text()
  assert "shown" in html and "reward=" in html
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def _command(workdir, steps):
  return [
      sys.executable, "-m", "varft.main", "--config=experiments/echo.py", f"--workdir={workdir}",
      f"--config.total_steps={steps}", "--config.checkpoint_every=7", "--config.samples_every=0",
      "--config.eval_every=0"
  ]


def _deterministic(rows):
  return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


def test_kill_9_then_restart_resumes_exactly(tmp_path):
  steps = 150
  # The three runs compile the same programs: share them through JAX's persistent cache.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  reference = tmp_path / "reference"
  subprocess.run(_command(reference, steps), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

  run = tmp_path / "run"
  proc = subprocess.Popen(_command(run, steps), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics, deadline = run / "metrics.jsonl", time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 20:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  logged = len(metrics_writer.read_metrics(str(run)))
  assert logged < steps
  complete = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
  # A checkpoint that was being written at the kill (a temporary folder, possibly of a later step than any
  # complete one) must never be restored.
  half_written = run / "checkpoints" / f"{steps - 1}.orbax-checkpoint-tmp-1234"
  (half_written / "state").mkdir(parents=True)
  (half_written / "state" / "garbage").write_text("partial")

  subprocess.run(_command(run, steps), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  resumed = _deterministic(metrics_writer.read_metrics(str(run)))
  expected = _deterministic(metrics_writer.read_metrics(str(reference)))
  assert len(resumed) == steps
  assert resumed == expected  # bitwise: floats compared exactly
  assert not half_written.exists()
  assert complete == [] or complete[-1] < steps
  assert expected[-1]["reward/mean"] > expected[0]["reward/mean"]
  kept = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
  assert kept[-1] == steps and len(kept) <= 3  # keep_checkpoints

  # Eval mode restores the latest checkpoint and evaluates it.
  config = echo.get_config()
  config.mode = "eval"
  metrics = evaluate.run(config, str(reference))
  assert metrics["eval/accuracy"] >= 0.8


def test_bad_config_values_fail_at_start_naming_the_key(tmp_path):
  config = echo.get_config()
  config.grpo.advantage = "mean"
  with pytest.raises(ValueError, match=r"config\.grpo\.advantage='mean'"):
    train.setup(config, str(tmp_path))
  config = echo.get_config()
  config.rollout.num_samples = 0
  with pytest.raises(ValueError, match=r"config\.rollout\.num_samples=0 must be a positive integer"):
    run_config.validate(config)
  config = echo.get_config()
  config.mesh.tensor = 3
  with pytest.raises(ValueError, match=r"config\.mesh"):
    run_config.validate(config)
  from experiments import coding, search
  for module in (search, coding):
    for arg in ("demo", "3b", "7b,multiturn", "demo,stepwise"):
      config = module.get_config(arg)
      if config.model.name != "tiny":
        with pytest.raises(ValueError, match=r"config\.model\.hf_dir is empty"):
          run_config.validate(config)
        config.model.hf_dir = str(tmp_path)
      run_config.validate(config)
    with pytest.raises(ValueError, match="must be demo"):
      module.get_config("13b")
  out = subprocess.run([
      sys.executable, "-m", "varft.main", "--config=experiments/echo.py", f"--workdir={tmp_path}",
      "--config.grpo.no_such_key=1"
  ], cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode != 0 and "no_such_key" in out.stderr


def test_search_demo_step_runs_the_agentic_loop_and_writes_every_output(tmp_path):
  """One GRPO step of the real pipeline (demo data, tiny Qwen2.5-VL, sampler, BM25 tool, rewards) + eval."""
  import json

  from experiments import search
  config = search.get_config("demo,multiturn")
  config.sft.steps = 0  # the GRPO step alone (tests/sft covers the warm-up)
  config.grpo.beta = 0.04  # the demo trains without the KL term; this step checks it
  config.total_steps = 1
  config.rollout.prompts_per_host = 2
  config.rollout.num_samples = 2
  config.rollout.max_new_tokens = 8
  config.eval.benchmarks = ("mat_search",)
  config.eval.num_prompts = 2
  config.eval.max_turns = 1
  metrics = train.train(config, str(tmp_path))
  for key in ("reward/answer_f1", "reward/format", "time/rollout_s", "time/rewards_s", "time/update_s", "train/loss",
              "train/kl", "train/entropy", "rollout/tool_calls", "eval/mat_search/f1", "tools/search/calls",
              "tools/search/errors", "eval/tools/search/calls"):
    assert key in metrics, key
  assert metrics["train/loss_tokens"] == 2 * 2 * 8  # only sampled tokens carry loss
  predictions = json.loads((tmp_path / "eval" / "step_000001" / "mat_search.json").read_text())
  assert len(predictions) == 2 and {"id", "question", "pred_answer", "gt"} <= set(predictions[0])
  assert (tmp_path / "eval" / "step_000001" / "mat_search_scores.txt").exists()
  assert (tmp_path / "checkpoints" / "1").is_dir() and (tmp_path / "hf" / "config.json").exists()
  assert list((tmp_path / "samples").glob("step_000001_*.png"))  # the prompt images of the sample rollouts
