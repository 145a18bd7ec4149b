"""Tasks by name (`varft.environment`), the loop over the task protocol, eval without training state, the task's
errors: a bad sample is skipped and counted, a bug propagates; the tool executor's counters per step."""
import json
import os
import struct

import jax
import numpy as np
import pytest

from experiments import echo
from varft import agent_task, echo_task, environment, evaluate, grpo, metrics_writer, preflight, run_config, train
from varft import rewards as rewards_lib
from varft.tools.executor import ToolCall, ToolExecutor


def _echo(steps=2):
  config = echo.get_config()
  config.total_steps = steps
  config.checkpoint_every = 1
  config.eval_every = 0
  config.samples_every = 0
  return config


def test_tasks_are_looked_up_by_name_and_an_unknown_name_fails_naming_the_known_ones():
  assert environment.get("echo").text_only and not environment.get("agent").text_only
  assert environment.get("agent").build is agent_task.AgentEnvironment
  config = _echo()
  assert train.model_config(config).text.vocab_size == config.model.echo.vocab_size
  config.task = "echoes"
  with pytest.raises(preflight.ConfigError, match=r"config\.task='echoes' is not one of \('agent', 'echo'\)"):
    run_config.validate(config)


class _Recording(echo_task.EchoEnvironment):
  """The echo task, recording the protocol calls the loop makes."""
  calls: list[str] = []

  def collect(self, params, rng, batches):
    self.calls.append("collect")
    return super().collect(params, rng, batches)

  def close(self):
    self.calls.append("close")


def _register(monkeypatch, task_class):
  task_class.calls = []
  spec = environment.TaskSpec(echo_task.config_model, True, task_class.from_config)
  monkeypatch.setitem(environment.TASKS, "recording", lambda: spec)


def test_the_loop_runs_the_registered_task_and_closes_it(tmp_path, monkeypatch):
  _register(monkeypatch, _Recording)
  config = _echo(steps=2)
  config.task = "recording"
  train.train(config, str(tmp_path))
  assert _Recording.calls == ["collect", "collect", "close"]


class _Failing(_Recording):

  def collect(self, params, rng, batches):
    raise RuntimeError("a bug in the task")


def test_a_failing_step_still_closes_the_task_and_frees_the_workdir(tmp_path, monkeypatch):
  _register(monkeypatch, _Failing)
  config = _echo()
  config.task = "recording"
  with pytest.raises(RuntimeError, match="a bug in the task"):
    train.train(config, str(tmp_path))
  assert _Failing.calls == ["close"]
  from varft import checkpoint as ckpt_lib
  ckpt_lib.WorkdirLock(str(tmp_path)).release()


def _no_training_state(*args, **kwargs):
  raise AssertionError("eval built training state")


def test_eval_builds_only_the_parameters_and_the_task(tmp_path, monkeypatch):
  train.train(_echo(steps=2), str(tmp_path))
  run, state = train.setup(_echo(steps=2), str(tmp_path))
  saved = train.restore(run, state)["train"]["params"]
  run.checkpointer.close()

  seen = {}

  def evaluate_task(self, params, rng, out_dir=None):
    seen["params"] = params
    return {"eval/accuracy": 0.5}

  monkeypatch.setattr(echo_task.EchoEnvironment, "evaluate", evaluate_task)
  for name in ("init_train_state", "make_optimizer"):
    monkeypatch.setattr(grpo, name, _no_training_state)
  monkeypatch.setattr(train, "make_optimizer", _no_training_state)
  monkeypatch.setattr(echo_task.EchoEnvironment, "train_data", _no_training_state)
  config = _echo()
  config.mode = "eval"
  assert evaluate.run(config, str(tmp_path)) == {"eval/accuracy": 0.5}
  for a, b in zip(jax.tree.leaves(seen["params"]), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.eval.checkpoint_step = 7
  with pytest.raises(FileNotFoundError, match="step 7"):
    evaluate.run(config, str(tmp_path))


class _Engine:
  """Rejects its first `rejections` batches whole, then rolls out; or fails with `error` (a bug)."""

  def __init__(self, rejections=0, error=None):
    self.rejections, self.error = rejections, error

  def run(self, params, examples, rng, num_samples):
    if self.error is not None:
      raise self.error
    if self.rejections:
      self.rejections -= 1
      raise environment.SampleRejected("No example could be prompted")
    return {"examples": examples}


def test_a_rejected_batch_is_skipped_and_counted_and_a_bug_propagates():
  batches = iter([[{"id": i}] for i in range(20)])
  examples, result, skipped = agent_task.rollout_next(_Engine(rejections=2), batches, None, None, 2)
  assert skipped == 2 and examples == [{"id": 2}] and result == {"examples": examples}
  with pytest.raises(ValueError, match="10 training batches in a row"):
    agent_task.rollout_next(_Engine(rejections=10), batches, None, None, 2)
  bug = ValueError("operands could not be broadcast together with shapes (4,) (3,)")
  with pytest.raises(ValueError, match="broadcast") as info:
    agent_task.rollout_next(_Engine(error=bug), iter([[{"id": 0}]]), None, None, 2)
  assert info.value is bug


def test_a_scoring_bug_propagates_instead_of_zeroing_the_rewards(monkeypatch):
  import ml_collections
  config = ml_collections.ConfigDict({"rewards": [("format", 1.0)], "reward_options": {"task": "search"}})
  good = "<think> ok </think><answer> 7 </answer>"

  def broken(*args, **kwargs):
    return np.zeros((4,)) + np.zeros((3,))  # a shape bug in the scoring

  monkeypatch.setattr(rewards_lib, "score_batch", broken)
  with pytest.raises(ValueError, match="broadcast"):
    agent_task.score_rows([good], [{"solution": "<answer> 7 </answer>"}], config)
  assert isinstance(agent_task.reference_error({"solution": 7}, 0, "search", None), environment.SampleRejected)
  assert agent_task.reference_error({"solution": "<answer> 7 </answer>"}, 0, "search", None) is None


def test_tool_counters_are_per_step_and_the_configured_tools_always_report():
  executor = ToolExecutor({})  # no backend: every call fails, and is counted
  try:
    assert agent_task.tool_metrics(executor, ("search",)) == {
        "tools/search/calls": 0.0,
        "tools/search/errors": 0.0,
        "tools/search/timeouts": 0.0
    }
    executor.execute([ToolCall("search", "who painted it"), ToolCall("search", "where")])
    step = agent_task.tool_metrics(executor, ("search",))
    assert step["tools/search/calls"] == 2 and step["tools/search/errors"] == 2
    assert step["tools/search/error_rate"] == 1.0 and "tools/search/wall_s_mean" in step
    assert agent_task.tool_metrics(executor, ("search",))["tools/search/calls"] == 0  # reset each step
  finally:
    executor.close()


def test_the_step_metrics_carry_the_tasks_tool_counters(tmp_path, monkeypatch):
  """Whatever a task's experience reports under `tools/` reaches metrics.jsonl (and TensorBoard) each step."""

  class Tooled(_Recording):

    def collect(self, params, rng, batches):
      experience = super().collect(params, rng, batches)
      experience.stats.update({"tools/search/calls": 3.0, "tools/search/wall_s_mean": 0.25})
      return experience

  _register(monkeypatch, Tooled)
  config = _echo(steps=2)
  config.task = "recording"
  metrics = train.train(config, str(tmp_path))
  assert metrics["tools/search/calls"] == 3.0
  rows = metrics_writer.read_metrics(str(tmp_path))
  assert [r["tools/search/wall_s_mean"] for r in rows] == [0.25, 0.25]
  assert json.loads((tmp_path / "config.json").read_text())["task"] == "recording"
  assert "tools/search/calls" in _tensorboard_tags(tmp_path / "tb")


def _tensorboard_tags(folder) -> set[str]:
  """The summary tags in a TensorBoard folder's event files (TFRecord framing: length, crc, event, crc)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for name in os.listdir(folder):
    data, pos = (folder / name).read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      tags.update(v.tag for v in event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]).summary.value)
      pos += 12 + length + 4
  return tags


def test_the_tasks_own_config_checks_run_at_start():
  from experiments import search
  config = search.get_config("demo")
  config.rollout.length_buckets = (512,)  # below rollout.max_total_tokens: RolloutConfig's own check
  with pytest.raises(preflight.ConfigError, match="largest length bucket 512 is below max_total_tokens 1024"):
    run_config.validate(config)
  config = search.get_config("demo,multiturn")
  config.reward_options.gold_injection = True
  with pytest.raises(preflight.ConfigError, match=r"config\.reward_options\.gold_injection is for step-wise"):
    run_config.validate(config)
  config = _echo()
  config.rollout.length_buckets = (512,)  # the echo task has no rollout engine: nothing to check
  run_config.validate(config)
