"""An agent evaluation streams its items through `eval.batch_size` slots, a bounded number of items per run."""
import types

import jax
import ml_collections

from varft import rollout
from varft.eval import stream


class RecordingEngine(rollout.RolloutEngine):
  """A RolloutEngine that records each run's items and slots and answers every item."""

  def __init__(self):  # pylint: disable=super-init-not-called  (no model: run is replaced)
    self.calls = []

  def run(self, params, examples, rng, num_samples=1, slots=None):
    self.calls.append(([ex["id"] for ex in examples], slots))
    return types.SimpleNamespace(transcripts=[
        types.SimpleNamespace(example_id=ex["id"], answer=ex["answers"][0], stop_reason="answer", render=lambda: "",
                              observations=[]) for ex in examples
    ])


def test_agent_eval_streams_many_items_through_batch_size_slots():
  config = ml_collections.ConfigDict({"eval": {"num_prompts": 0, "batch_size": 4, "resize": -1}, "data": {"resize": 0}})
  engine = RecordingEngine()
  env = types.SimpleNamespace(config=config, eval_engine=engine, eval_settings={})
  source = [{"id": f"m-{i}", "question": "q", "answers": [f"gold {i}"]} for i in range(70)]
  metrics = stream.evaluate_source(env, "mat_search", source, None, jax.random.key(0), None)
  per_run = 4 * stream.EVAL_STREAM_BATCHES
  assert [len(ids) for ids, _ in engine.calls] == [per_run, per_run, 70 - 2 * per_run]
  assert {slots for _, slots in engine.calls} == {4}
  assert [i for ids, _ in engine.calls for i in ids] == [f"m-{i}" for i in range(70)]
  assert metrics["eval/mat_search/answered"] == 1.0
