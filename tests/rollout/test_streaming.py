"""Evaluation streaming: more items than device slots, a finished trajectory's slot takes the next item."""
import jax
import numpy as np
import pytest

from tests.rollout import scripted
from varft import rollout
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model
from varft.processing import chat

CFG = config_lib.get_config("tiny")
EXAMPLES = [{"id": f"q{i}", "task": "search", "question": f"Question {i}?" + " more" * i} for i in range(5)]


@pytest.fixture(scope="module")
def runs():
  tokenizer = chat.load_tokenizer()
  params = model.init_params(jax.random.PRNGKey(0), CFG)
  config = rollout.RolloutConfig(mode="multiturn", max_turns=3, max_new_tokens=16, max_total_tokens=512,
                                 length_buckets=(512,), chunk_buckets=(64,), temperature=0.0)
  text = {(i, 1): f"<search> q{i} </search>" if i % 2 == 0 else f"<answer> a{i} </answer>" for i in range(5)}
  text.update({(i, 2): f"<answer> b{i} </answer>" for i in range(5)})
  engine = scripted.ScriptedEngine(CFG, tokenizer, scripted.InstantSearch(), config,
                                   script=lambda row, turn: tokenizer.encode(text[(row, turn)]))
  return [engine.run(params, EXAMPLES, jax.random.PRNGKey(0), slots=slots) for slots in (None, 2)]


def test_two_slots_stream_five_items_with_the_same_trajectories(runs):
  whole, streamed = runs
  assert [t.example_id for t in streamed.transcripts] == [f"q{i}" for i in range(5)]
  assert [t.answer for t in streamed.transcripts] == ["b0", "a1", "b2", "a3", "b4"]
  assert [t.stop_reason for t in streamed.transcripts] == ["answer"] * 5
  for key in ("tokens", "loss_mask", "positions", "attention_mask"):
    np.testing.assert_array_equal(streamed.batch[key], whole.batch[key])
  np.testing.assert_allclose(streamed.batch["sampler_logps"], whole.batch["sampler_logps"], atol=1e-4)
  # Every prompt prefilled once, in several admissions: 2 slots take the items in turn, over more decode steps.
  assert streamed.stats["prefill_tokens"] == whole.stats["prefill_tokens"]
  assert streamed.stats["decode_steps"] > whole.stats["decode_steps"]


def test_too_few_slots_for_a_group_is_an_error(runs):
  engine_config = rollout.RolloutConfig(mode="multiturn", max_total_tokens=512, length_buckets=(512,))
  engine = rollout.RolloutEngine(CFG, chat.load_tokenizer(), scripted.InstantSearch(), engine_config)
  with pytest.raises(ValueError, match="1 slots cannot hold a prompt's 2 samples"):
    engine.run(None, EXAMPLES[:1], jax.random.PRNGKey(0), num_samples=2, slots=1)
