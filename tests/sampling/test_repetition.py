"""The sampler's repetition penalty (against transformers' logits processor) and stopping at EOS only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varft import sampling
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text
from varft.processing import chat

torch = pytest.importorskip("torch")
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor  # noqa: E402

CFG = config_lib.get_config("tiny")
PROMPTS = [[9707, 11, 1879, 0, 358, 1079], [785, 6722, 315, 9625, 374, 12095, 13, 576], [40, 40, 41]]


@pytest.fixture(scope="module")
def params():
  # Default-scale weights: greedy decoding repeats tokens, which is what the penalty acts on.
  return {"text": text.init_params(jax.random.PRNGKey(0), CFG.text)}


@pytest.fixture(scope="module")
def tokenizer():
  return chat.load_tokenizer()


def _context(rows, width):
  context = np.full((len(rows), width), -1, np.int32)
  for b, r in enumerate(rows):
    context[b, :len(r)] = r
  return context


@pytest.mark.parametrize("penalty", [1.05, 1.5, 0.7])
def test_penalty_equals_transformers_processor(penalty):
  rng = np.random.default_rng(0)
  vocab, rows = 300, [list(rng.integers(0, 300, 40)), list(rng.integers(0, 300, 7)), [5, 5, 5]]
  logits = rng.normal(0, 3, (3, vocab)).astype(np.float32)
  logits[0, rows[0][0]] = 0.0  # a seen logit of exactly zero stays zero
  seen = sampling.seen_tokens(jnp.asarray(_context(rows, 48)), vocab)
  ours = sampling.apply_repetition_penalty(jnp.asarray(logits), seen, jnp.full((3,), penalty))
  processor = RepetitionPenaltyLogitsProcessor(penalty)
  for b, r in enumerate(rows):
    expected = processor(torch.tensor([r]), torch.tensor(logits[b:b + 1]))[0].numpy()
    np.testing.assert_allclose(np.asarray(ours[b]), expected, rtol=1e-6, atol=0)
  assert not np.allclose(np.asarray(ours), logits)


def _full_logits(params, seq):
  ids = jnp.asarray([seq], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(len(seq))[None, None], (3, 1, len(seq)))
  hidden, _ = text.forward(params["text"], CFG.text, text.embed_tokens(params["text"], ids), pos,
                           attention_mask=jnp.ones_like(ids))
  return text.logits(params["text"], CFG.text, hidden[:, -1])[0]


def _greedy_reference(params, prompt, penalty, steps):
  """transformers' greedy loop: penalty over prompt + generated tokens, then argmax."""
  processor = RepetitionPenaltyLogitsProcessor(penalty)
  seq = list(prompt)
  for _ in range(steps):
    scores = torch.tensor(np.asarray(_full_logits(params, seq))[None])
    seq.append(int(processor(torch.tensor([seq]), scores)[0].argmax()))
  return seq[len(prompt):]


def _generate(sampler, params, rows, penalties, steps, cache_len=64):
  cache = sampler.new_cache(len(rows), cache_len)
  hidden, cache = sampler.extend(params, cache, sampling.text_chunk(rows, [0] * len(rows), 16))
  repetition = None if penalties is None else (_context(rows, cache_len), np.asarray(penalties, np.float32))
  out, _ = sampler.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(0), [steps] * len(rows),
                            repetition=repetition)
  return [list(np.asarray(out.tokens)[b, :int(out.num_tokens[b])]) for b in range(len(rows))], out


def test_greedy_with_penalty_equals_transformers_loop_without_recompiles(params):
  steps = 10
  table = sampling.StopTable(np.zeros((CFG.text.vocab_size,), np.int32), np.ones((1, 1), np.int32), ())
  sampler = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=0, max_new_tokens=steps, eos_ids=()), table)
  plain, _ = _generate(sampler, params, PROMPTS, None, steps)
  penalised, out = _generate(sampler, params, PROMPTS, [1.0, 3.0, 3.0], steps)
  warm = sampler.compile_count()
  assert penalised[0] == plain[0]  # penalty 1 on a row: unchanged
  for b, penalty in ((1, 3.0), (2, 3.0)):
    assert penalised[b] == _greedy_reference(params, PROMPTS[b], penalty, steps)
  assert penalised[1] != plain[1] and penalised[2] != plain[2]
  assert len(set(plain[1])) < steps and len(set(penalised[1])) == steps  # penalty 3 breaks the repetition
  # Log-probs are those of the penalised distribution.
  seq = PROMPTS[1] + penalised[1][:3]
  scores = sampling.apply_repetition_penalty(
      _full_logits(params, seq)[None], sampling.seen_tokens(jnp.asarray([seq]), CFG.text.vocab_size),
      jnp.asarray([3.0]))
  np.testing.assert_allclose(out.logps[1, 3], jax.nn.log_softmax(scores[0])[penalised[1][3]], atol=1e-4)
  # Another penalty value and other contexts run through the same programs.
  _generate(sampler, params, [[1, 2], [3], [4, 4, 4, 4]], [1.05, 1.2, 2.0], steps)
  assert sampler.compile_count() == warm


def test_empty_stop_table_stops_on_eos_and_budget_only(params, tokenizer):
  steps = 14
  table = sampling.make_stop_table(tokenizer, CFG.text.vocab_size, ())
  assert table.strings == ()
  eos = (tokenizer.im_end_id, tokenizer.end_of_text_id)
  sampler = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=1.0, max_new_tokens=steps, eos_ids=eos), table)
  scripts = [
      tokenizer.encode("<search> who? </search> more"),
      tokenizer.encode("<answer> 3 </answer>") + [tokenizer.im_end_id] + [5] * 8
  ]
  forced = np.full((2, steps), -1, np.int32)
  for b, s in enumerate(scripts):
    forced[b, :min(len(s), steps)] = s[:steps]
  rows = PROMPTS[:2]
  hidden, cache = sampler.extend(params, sampler.new_cache(2, 64), sampling.text_chunk(rows, [0, 0], 16))
  out, _ = sampler.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(1), [steps, steps],
                            forced)
  np.testing.assert_array_equal(out.stop_reason, [sampling.LENGTH, sampling.EOS])
  np.testing.assert_array_equal(out.num_tokens, [steps, len(scripts[1]) - 8])
  assert list(np.asarray(out.stop_index)) == [-1, -1]
