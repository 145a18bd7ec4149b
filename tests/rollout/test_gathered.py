"""Continuous schedule computing only live rows (gathered decode and extend batches) against lock-step, greedy."""
import concurrent.futures
import time

import jax
import numpy as np
import pytest

from tests.rollout import scripted
from varft import rollout, sampling
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model
from varft.processing import chat

CFG = config_lib.get_config("tiny")
ROWS = 16
EXAMPLES = [{"id": f"q{i}", "task": "search", "question": f"Question {i}?"} for i in range(ROWS)]


class StaggeredSearch(scripted.InstantSearch):
  """Search answers after 0-0.3 s by call, so rows rejoin at different times while others decode."""

  def __init__(self):
    self.pool = concurrent.futures.ThreadPoolExecutor(ROWS)

  def submit(self, call):
    row = int(call.call_id.split(":")[0])
    return self.pool.submit(lambda: (time.sleep(0.1 * (row % 4)), self.execute([call])[0])[1])


@pytest.fixture(scope="module")
def runs():
  tokenizer = chat.load_tokenizer()
  params = model.init_params(jax.random.PRNGKey(0), CFG)
  # Each turn samples 1-8 free (greedy) tokens, then is forced to its action: rows stop one after another.
  text = {(i, 1): [-1] * (1 + i % 8) + tokenizer.encode(f"<search> q{i} </search>") for i in range(ROWS)}
  text.update({(i, 2): [-1] * (1 + (3 * i) % 8) + tokenizer.encode(f"<answer> a{i} </answer>") for i in range(ROWS)})
  out = {}
  # Instant tools (one `execute` per flush) make the schedule independent of timing: the run repeats exactly.
  plan = [("lockstep", "lockstep", StaggeredSearch()), ("continuous", "continuous", StaggeredSearch()),
          ("instant", "continuous", scripted.InstantSearch()),
          ("instant_again", "continuous", scripted.InstantSearch())]
  for run, schedule, tools in plan:
    config = rollout.RolloutConfig(mode="multiturn", max_turns=3, max_new_tokens=32, max_total_tokens=512,
                                   length_buckets=(512,), chunk_buckets=(64,), temperature=0.0, rejoin_fraction=0.0,
                                   schedule=schedule)
    engine = scripted.ScriptedEngine(CFG, tokenizer, tools, config, script=lambda r, t: text[(r, t)])
    out[run] = engine.run(params, EXAMPLES, jax.random.PRNGKey(0))
    out[f"{run}_compiles"] = sampling.Sampler.compile_count()
  return out


def test_gathered_rows_give_the_lockstep_tokens(runs):
  lockstep, continuous = runs["lockstep"], runs["continuous"]
  assert [t.answer for t in continuous.transcripts] == [f"a{i}" for i in range(ROWS)]
  for key in ("tokens", "loss_mask", "positions", "attention_mask"):
    np.testing.assert_array_equal(continuous.batch[key], lockstep.batch[key])
  np.testing.assert_allclose(continuous.batch["sampler_logps"], lockstep.batch["sampler_logps"], atol=1e-4)


def test_only_live_rows_are_computed(runs):
  lockstep, continuous = runs["lockstep"].stats, runs["continuous"].stats
  # Rejoining rows extend alone (gathered, not over all 16 slots) and the decode steps skip waiting rows.
  assert continuous["extends"] > lockstep["extends"]
  assert continuous["extend_rows"] < continuous["extends"] * ROWS
  assert continuous["decode_rows"] < continuous["decode_steps"] * ROWS
  assert continuous["live_slot_fraction"] > lockstep["live_slot_fraction"]
  assert continuous["sampled_tokens"] == lockstep["sampled_tokens"]


def test_gathered_programs_are_bounded_by_the_buckets_and_compile_once(runs):
  # Past lock-step's in-place programs, the continuous runs add at most a gathered extend and generate per row
  # bucket at most half the slots (4, 6, 8), whatever their counts of live rows.
  buckets = {sampling.row_bucket(n) for n in range(1, ROWS + 1)} & set(range(ROWS // 2 + 1))
  assert runs["instant_again_compiles"] - runs["lockstep_compiles"] <= 2 * len(buckets) == 6
  assert runs["instant_again_compiles"] == runs["instant_compiles"]
  instant = runs["instant_again"]
  assert instant.stats["decode_rows"] < instant.stats["decode_steps"] * ROWS
  np.testing.assert_array_equal(instant.batch["tokens"], runs["lockstep"].batch["tokens"])
