"""Continuous schedule: rows whose observations are in rejoin together (`rejoin_fraction`), not one extend each."""
import dataclasses

import jax
import numpy as np
import pytest

from tests.rollout import scripted
from varft import rollout
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model
from varft.processing import chat

CFG = config_lib.get_config("tiny")
EXAMPLES = [{"id": f"q{i}", "task": "search", "question": f"Question {i}?"} for i in range(8)]


@pytest.fixture(scope="module")
def runs():
  tokenizer = chat.load_tokenizer()
  params = model.init_params(jax.random.PRNGKey(0), CFG)
  base = rollout.RolloutConfig(mode="multiturn", max_turns=3, max_new_tokens=32, max_total_tokens=512,
                               length_buckets=(512,), chunk_buckets=(64,), temperature=0.0)
  # Row i searches after 2 + 2i free tokens, so the rows stop one after another; then each answers.
  text = {(i, 1): [300] * (2 + 2 * i) + tokenizer.encode(f"<search> q{i} </search>") for i in range(8)}
  text.update({(i, 2): tokenizer.encode(f"<answer> a{i} </answer>") for i in range(8)})
  out = {}
  for fraction in (0.0, 1.0):
    config = dataclasses.replace(base, rejoin_fraction=fraction)
    engine = scripted.ScriptedEngine(CFG, tokenizer, scripted.InstantSearch(), config, script=lambda r, t: text[(r, t)])
    out[fraction] = engine.run(params, EXAMPLES, jax.random.PRNGKey(0))
  return out


def test_ready_rows_wait_to_rejoin_together_with_the_same_trajectories(runs):
  eager, grouped = runs[0.0], runs[1.0]
  assert [t.answer for t in grouped.transcripts] == [f"a{i}" for i in range(8)]
  assert [t.answer for t in eager.transcripts] == [f"a{i}" for i in range(8)]
  # Eager: a row rejoins as soon as its search is back, so the staggered stops make several extends; grouped: the
  # rows rejoin once none is decoding, in one extend.
  assert eager.stats["extends"] >= 3
  assert grouped.stats["extends"] == 1
  for key in ("tokens", "loss_mask", "positions", "attention_mask"):
    np.testing.assert_array_equal(grouped.batch[key], eager.batch[key])


def test_rejoin_fraction_is_checked():
  with pytest.raises(ValueError, match="rejoin_fraction must be in"):
    rollout.RolloutConfig(rejoin_fraction=1.5)
