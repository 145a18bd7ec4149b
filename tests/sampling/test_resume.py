"""The sampler's resumable generate (early exit, a stop string across calls), an extend that keeps the rows it does not
touch, one prefill per group, programs over gathered rows; the next-token state is each row's last hidden state."""
import jax
import numpy as np
import pytest

from tests.sampling.test_sampling import PROMPTS, full_logits, next_logits, prefill
from varft import sampling, turns
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text
from varft.processing import chat

CFG = config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def tokenizer():
  return chat.load_tokenizer()


@pytest.fixture(scope="module")
def params():
  p = text.init_params(jax.random.PRNGKey(0), CFG.text)
  return {"text": jax.tree.map(lambda x: x * 6 if x.ndim > 1 else x, p)}


@pytest.fixture(scope="module")
def sampler(tokenizer):
  table = sampling.make_stop_table(tokenizer, CFG.text.vocab_size, turns.AGENT_STOP_TAGS)
  return sampling.Sampler(CFG, sampling.SamplingConfig(temperature=0, max_new_tokens=12, eos_ids=()), table)


def test_an_early_exit_resumed_equals_one_call(params, sampler):
  hidden, cache = prefill(sampler, params, PROMPTS)
  whole, _ = sampler.generate(params, cache, hidden, [len(r) for r in PROMPTS], jax.random.PRNGKey(0), [12, 5, 9])
  hidden, cache = prefill(sampler, params, PROMPTS)
  before = sampler.compile_count()
  first, cache = sampler.generate(params, cache, hidden, [len(r) for r in PROMPTS], jax.random.PRNGKey(0), [12, 5, 9],
                                  exit_after=1)
  assert int(first.steps) == 5  # row 1 ran out of its budget at step 5: one row stopped, the call returns
  np.testing.assert_array_equal(first.num_tokens, [5, 5, 5])
  np.testing.assert_array_equal(first.stop_reason, [sampling.NOT_RUN, sampling.LENGTH, sampling.NOT_RUN])
  budget = [7, 0, 4]
  second, cache = sampler.generate(params, cache, first.hidden, first.next_positions, jax.random.PRNGKey(1), budget,
                                   max_steps=3)
  assert int(second.steps) == 3 and sampler.compile_count() == before  # traced limits: one program
  third, _ = sampler.generate(params, cache, second.hidden, second.next_positions, jax.random.PRNGKey(2), [4, 0, 1])
  for b, total in enumerate([12, 5, 9]):
    got = [int(t) for o in (first, second, third) for t in o.tokens[b, :int(o.num_tokens[b])]]
    np.testing.assert_array_equal(got, whole.tokens[b, :total])
  np.testing.assert_array_equal(third.stop_reason, [sampling.LENGTH, sampling.NOT_RUN, sampling.LENGTH])


def test_a_stop_string_split_over_two_calls_stops(params, sampler, tokenizer):
  ids = tokenizer.encode("<search> who? </search> more")
  end = len(tokenizer.encode("<search> who? </search>"))
  cut = end - 1  # the call ends inside `</search>`
  rows = PROMPTS[:2]
  hidden, cache = prefill(sampler, params, rows)
  forced = np.full((2, 12), -1, np.int32)
  forced[:, :cut] = ids[:cut]
  first, cache = sampler.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(0), [cut, cut],
                                  forced)
  np.testing.assert_array_equal(first.stop_reason, [sampling.LENGTH] * 2)
  forced = np.full((2, 12), -1, np.int32)
  forced[:, :len(ids) - cut] = ids[cut:]
  recent = np.full((2, sampler.stop_window), -1, np.int32)
  tail = ids[:cut][-sampler.stop_window:]
  recent[0, sampler.stop_window - len(tail):] = tail  # row 0 carries its window, row 1 does not
  second, _ = sampler.generate(params, cache, first.hidden, first.next_positions, jax.random.PRNGKey(0), [12, 4],
                               forced, recent=recent)
  np.testing.assert_array_equal(second.stop_reason, [sampling.STOP_TAG, sampling.LENGTH])
  np.testing.assert_array_equal(second.num_tokens, [1, 4])
  assert sampler.stop_table.strings[int(second.stop_index[0])] == "</search>"


def test_extend_keeps_the_logits_of_rows_it_does_not_touch(params, sampler):
  hidden, cache = prefill(sampler, params, PROMPTS)
  kept = np.asarray(hidden)
  chunk = sampling.text_chunk([[11, 12], [], [13]], [len(r) for r in PROMPTS], 16)
  merged, cache = sampler.extend(params, cache, chunk, hidden=hidden)
  np.testing.assert_array_equal(merged[1], kept[1])
  np.testing.assert_allclose(next_logits(params, merged)[0], full_logits(params, [PROMPTS[0] + [11, 12]])[0], atol=1e-4)
  np.testing.assert_array_equal(cache["length"], [len(PROMPTS[0]) + 2, len(PROMPTS[1]), len(PROMPTS[2]) + 1])


def test_one_prefill_per_group_equals_prefilling_every_row(params, sampler):
  groups = [PROMPTS[0], PROMPTS[1]]
  rows = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
  hidden, cache = prefill(sampler, params, rows)
  want, _ = sampler.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(3), [12] * 6)
  cache, hidden = sampler.new_cache(6, 96), sampler.empty_hidden(6)
  hidden, cache = sampler.prefill(params, cache, hidden, sampling.text_chunk(groups, [0, 0], 32), [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(cache["length"], [len(r) for r in rows])
  got, cache = sampler.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(3), [12] * 6)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logps, want.logps, atol=1e-5)
  # Reusing one slot: row 4 gets a new prompt (reset to it), the other rows and their states are untouched.
  before = np.asarray(got.hidden)
  hidden, cache = sampler.prefill(params, cache, got.hidden, sampling.text_chunk([PROMPTS[2], []], [0, 0], 32),
                                  [-1, -1, -1, -1, 0, -1])
  assert int(cache["length"][4]) == len(PROMPTS[2]) and int(cache["length"][0]) == len(rows[0]) + 12
  np.testing.assert_array_equal(np.delete(np.asarray(hidden), 4, 0), np.delete(before, 4, 0))
  np.testing.assert_allclose(next_logits(params, hidden)[4], full_logits(params, [PROMPTS[2]])[0], atol=1e-4)
  seq = rows[0] + [int(t) for t in got.tokens[0]]
  out, _ = sampler.generate(params, cache, hidden, [len(seq)] * 4 + [len(PROMPTS[2]), len(seq)], jax.random.PRNGKey(4),
                            [2, 0, 0, 0, 0, 0])
  assert int(out.tokens[0, 0]) == int(np.argmax(full_logits(params, [seq])[0]))


def test_a_gathered_extend_touches_only_its_rows(params, sampler):
  """Rows 2 and 0 extended through a gathered batch of 4 (two padding rows): the same states and cache as
  the in-place extend; row 1's state and cache rows are bit-identical to before; no full-cache copy is kept."""
  hidden, cache = prefill(sampler, params, PROMPTS)
  kept_hidden, kept_k = np.array(hidden), np.array(cache["k"])
  chunk = sampling.text_chunk([[13], [11, 12], [], []], [len(PROMPTS[2]), len(PROMPTS[0]), 0, 0], 16)
  merged, gathered = sampler.extend(params, cache, chunk, hidden=hidden, rows=[2, 0, -1, -1])
  assert cache["k"].is_deleted() and hidden.is_deleted()
  np.testing.assert_array_equal(merged[1], kept_hidden[1])
  np.testing.assert_array_equal(np.asarray(gathered["k"])[:, 1], kept_k[:, 1])
  np.testing.assert_array_equal(gathered["length"], [len(PROMPTS[0]) + 2, len(PROMPTS[1]), len(PROMPTS[2]) + 1])
  hidden, cache = prefill(sampler, params, PROMPTS)
  in_place, cache = sampler.extend(params, cache,
                                   sampling.text_chunk([[11, 12], [], [13]], [len(r) for r in PROMPTS], 16),
                                   hidden=hidden)
  # Relative too: a batch of 4 rows and one of 3 run different matmul shapes (keys of ~10 differ by ~25 ulp).
  np.testing.assert_allclose(merged, in_place, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gathered["k"], cache["k"], rtol=1e-5, atol=1e-5)


def test_a_gathered_generate_equals_decoding_in_place(params, sampler):
  """Rows 0 and 2 decode in a gathered batch of 4; row 1 (not decoding) keeps its cache and state bit for bit,
  and the decoded rows' tokens equal an in-place call's with row 1 at budget 0."""
  hidden, cache = prefill(sampler, params, PROMPTS)
  want, _ = sampler.generate(params, cache, hidden, [len(r) for r in PROMPTS], jax.random.PRNGKey(0), [12, 0, 7])
  hidden, cache = prefill(sampler, params, PROMPTS)
  kept_hidden, kept_k = np.array(hidden), np.array(cache["k"])
  got, gathered = sampler.generate(params, cache, hidden, [len(PROMPTS[2]), len(PROMPTS[0]), 0, 0],
                                   jax.random.PRNGKey(0), [7, 12, 0, 0], rows=[2, 0, -1, -1])
  assert got.tokens.shape == (4, 12) and got.hidden.shape == kept_hidden.shape
  np.testing.assert_array_equal(got.tokens[1], want.tokens[0])
  np.testing.assert_array_equal(got.tokens[0, :7], want.tokens[2, :7])
  np.testing.assert_array_equal(got.num_tokens, [7, 12, 0, 0])
  np.testing.assert_allclose(np.asarray(got.hidden)[[0, 2]], np.asarray(want.hidden)[[0, 2]], atol=1e-4)
  np.testing.assert_array_equal(got.hidden[1], kept_hidden[1])
  np.testing.assert_array_equal(np.asarray(gathered["k"])[:, 1], kept_k[:, 1])
  np.testing.assert_array_equal(gathered["length"], [len(PROMPTS[0]) + 12, len(PROMPTS[1]), len(PROMPTS[2]) + 7])


def test_row_bucket():
  assert [sampling.row_bucket(n) for n in (1, 4, 5, 7, 9, 13, 17, 25, 33, 49)] == [4, 4, 6, 8, 12, 16, 24, 32, 48, 64]
  assert sampling.row_bucket(5, multiple=2) == 8 and sampling.row_bucket(17, multiple=2) == 24


def test_a_gathered_generate_holds_its_rows_not_a_second_cache(sampler):
  """Compiled at 32 rows of 1024 slots, a generate over 4 gathered rows needs temporaries well under the cache: the
  4 rows' cache and the logits of their step, the cache and hidden states being donated and written back in place."""
  rows, slots, width = 32, 1024, 4
  cache = jax.eval_shape(lambda: text.init_cache(CFG.text, rows, slots))
  abstract = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32)
  params = {"text": jax.eval_shape(lambda: text.init_params(jax.random.PRNGKey(0), CFG.text))}
  hidden = jax.ShapeDtypeStruct((rows, CFG.text.hidden_size), np.float32)
  table = sampler.stop_table
  args = (params, cache, hidden, abstract(width), abstract(width), jax.random.PRNGKey(0), abstract(width),
          abstract(width, 12), abstract(*table.token_bits.shape), abstract(*table.pattern_bits.shape), None,
          abstract(width, sampler.stop_window), abstract(), abstract())
  compiled = sampling._generate_rows_jit.lower(*args, model_config=CFG, sampling=sampler.sampling).compile()
  memory = compiled.memory_analysis()
  cache_bytes = cache["k"].size * 4 * 2
  row_bytes = cache_bytes // rows + CFG.text.vocab_size * 4  # a row's cache and its step's logits
  assert memory.alias_size_in_bytes >= cache_bytes  # donated: written in place
  assert memory.temp_size_in_bytes < min(3 * width * row_bytes, cache_bytes)


def test_a_gathered_call_resumed_equals_one_call_in_place(params, sampler):
  """Rows decoded gathered (in another order, with a padding row) over two calls, the second resumed from the
  hidden states the first returned (all the cache's rows, (B, D)), give the tokens and log-probs of one call."""
  starts, budget = [len(r) for r in PROMPTS], [12, 5, 9]
  hidden, cache = prefill(sampler, params, PROMPTS)
  want, _ = sampler.generate(params, cache, hidden, starts, jax.random.PRNGKey(0), budget)
  hidden, cache = prefill(sampler, params, PROMPTS)
  order, rows = [2, 0, 1], [2, 0, 1, -1]
  positions, limits = [starts[b] for b in order] + [0], [budget[b] for b in order] + [0]
  first, cache = sampler.generate(params, cache, hidden, positions, jax.random.PRNGKey(0), limits, max_steps=4,
                                  rows=rows)
  assert first.hidden.shape == (len(PROMPTS), CFG.text.hidden_size)
  rest = np.maximum(np.asarray(limits) - np.asarray(first.num_tokens), 0)
  second, _ = sampler.generate(params, cache, first.hidden, first.next_positions, jax.random.PRNGKey(1), rest,
                               rows=rows)
  for j, b in enumerate(order):
    got = np.concatenate([first.tokens[j, :int(first.num_tokens[j])], second.tokens[j, :int(second.num_tokens[j])]])
    logps = np.concatenate([first.logps[j, :int(first.num_tokens[j])], second.logps[j, :int(second.num_tokens[j])]])
    np.testing.assert_array_equal(got, want.tokens[b, :int(want.num_tokens[b])])
    np.testing.assert_allclose(logps, want.logps[b, :int(want.num_tokens[b])], atol=1e-5)
