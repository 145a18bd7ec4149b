"""Host-side pieces of the agentic task: reward references, the rollout stats and config."""
import numpy as np

from varft import agent_task


def test_references_per_mode():
  examples = [{"solution": "<answer> 7 </answer>", "step_type": "answer", "answers": ["7"], "task": "multihop"}]
  refs, types = agent_task.references(examples, "stepwise")
  assert refs == [{"solution": "<answer> 7 </answer>", "step_type": "answer"}] and types is None
  refs, types = agent_task.references(examples, "multiturn")
  assert refs == [{"answers": ["7"]}] and types == ["answer"]


def test_rollout_stats_are_flattened_for_logging():
  flat = agent_task._flat_stats({
      "tool_calls": 3,
      "generate_s": 1.5,
      "stop_reasons": {
          "answer": 3,
          "malformed": 1
      },
      "note": "text"
  })
  assert flat == {
      "rollout/tool_calls": 3.0,
      "time/generate_s": 1.5,
      "rollout/stop_answer": 0.75,
      "rollout/stop_malformed": 0.25
  }


def test_rollout_config_from_the_experiment_config():
  from experiments import search
  config = search.get_config("demo,multiturn")
  engine_config = agent_task.rollout_config(config.rollout, temperature=0.0)
  assert engine_config.mode == "multiturn" and engine_config.temperature == 0.0
  assert engine_config.max_total_tokens == config.rollout.max_total_tokens
  config.rollout.unlock()
  config.rollout.max_new_tokns = 3
  import pytest
  with pytest.raises(ValueError, match="max_new_tokns"):
    agent_task.rollout_config(config.rollout)


def test_a_reference_that_cannot_be_scored_costs_only_its_own_row():
  import ml_collections
  config = ml_collections.ConfigDict({"rewards": [("format", 1.0)], "reward_options": {"task": "search"}})
  good = "<think> ok </think><answer> 7 </answer>"
  refs = [{"solution": "<answer> 7 </answer>"}, {"solution": 7}, {"solution": "<answer> 7 </answer>"}]
  total, components, errors = agent_task.score_rows([good, good, "no tags"], refs, config)
  assert errors == 1
  np.testing.assert_array_equal(total, [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(components["format"], [1.0, 0.0, 0.0])
  total, _, errors = agent_task.score_rows([good], refs[:1], config)
  assert errors == 0 and total[0] == 1.0
