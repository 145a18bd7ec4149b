"""Host-side pieces of the agentic task: reward references, scoring subsets, image resizing, the rollout config."""
import io

import numpy as np
from PIL import Image

from varft import agent_task


def test_references_per_mode():
  examples = [{"solution": "<answer> 7 </answer>", "step_type": "answer", "answers": ["7"], "task": "multihop"}]
  refs, types = agent_task.references(examples, "stepwise")
  assert refs == [{"solution": "<answer> 7 </answer>", "step_type": "answer"}] and types is None
  refs, types = agent_task.references(examples, "multiturn")
  assert refs == [{"answers": ["7"]}] and types == ["answer"]


def test_score_items_full_benchmark_and_subset():
  items = [{"pred_answer": "Paris", "gt": ["paris"]}, {"pred_answer": None, "gt": "Rome"}]
  subset = agent_task.score_items(items, "mat_search")  # 2 of 150 items: one split, no simple/hard
  assert subset["all"] == {"f1": 50.0, "em": 50.0, "count": 2} and subset["num_missing"] == 1
  assert "simple" not in subset
  full = agent_task.score_items(items * 75, "mat_search")
  assert full["simple"]["count"] == 75 and full["all"]["em"] == 50.0
  assert agent_task.score_items(items, "multihop_demo")["all"]["f1"] == 50.0


def test_resizer_resizes_and_keeps_unreadable_images():
  buffer = io.BytesIO()
  Image.new("RGB", (40, 20), (255, 0, 0)).save(buffer, format="PNG")
  out = agent_task.resizer(32)({"id": "a", "images": [buffer.getvalue(), b"not an image"]})
  assert Image.open(io.BytesIO(out["images"][0])).size == (32, 32)
  assert out["images"][1] == b"not an image" and out["id"] == "a"
  assert agent_task.resizer(0) is None


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
