"""The jitted sampler: greedy equals argmax re-decoding, extend equals prefill, stop rules, filters, no recompiles."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varft import sampling, sampling_draw, turns
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text
from varft.processing import chat

CFG = config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def tokenizer():
  return chat.load_tokenizer()


@pytest.fixture(scope="module")
def stop_table(tokenizer):
  return sampling.make_stop_table(tokenizer, CFG.text.vocab_size, turns.AGENT_STOP_TAGS)


@pytest.fixture(scope="module")
def params():
  # Larger-than-default weights so that greedy decoding does not collapse onto one repeated token.
  p = text.init_params(jax.random.PRNGKey(0), CFG.text)
  return {"text": jax.tree.map(lambda x: x * 6 if x.ndim > 1 else x, p)}


def all_logits(params, rows):
  """Logits at every position of each (right-padded) row by one cache-free forward pass: (B, T, V)."""
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for b, r in enumerate(rows):
    ids[b, :len(r)], mask[b, :len(r)] = r, 1
  pos = jnp.broadcast_to(jnp.arange(length)[None, None], (3, len(rows), length))
  hidden, _ = _forward(params["text"], jnp.asarray(ids), pos, jnp.asarray(mask))
  return text.logits(params["text"], CFG.text, hidden)


@jax.jit
def _forward(text_params, ids, pos, mask):
  return text.forward(text_params, CFG.text, text.embed_tokens(text_params, ids), pos, attention_mask=mask)


def next_logits(params, hidden):
  """The next-token logits of the sampler's next-token state (last hidden states (B, D))."""
  return text.logits(params["text"], CFG.text, hidden)


def full_logits(params, rows):
  """Last-token logits of each row."""
  logits = all_logits(params, rows)
  return jnp.stack([logits[b, len(r) - 1] for b, r in enumerate(rows)])


def prefill(sampler, params, rows, cache_len=96, chunk=32):
  cache = sampler.new_cache(len(rows), cache_len)
  return sampler.extend(params, cache, sampling.text_chunk(rows, [0] * len(rows), chunk))


PROMPTS = [[9707, 11, 1879, 0, 358, 1079], [785, 6722, 315, 9625, 374, 12095, 13, 576, 5590, 11, 323, 1221], [40]]


def test_greedy_equals_argmax_of_full_forward(params, stop_table):
  sampler = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=0, max_new_tokens=12, eos_ids=()), stop_table)
  hidden, cache = prefill(sampler, params, PROMPTS)
  out, cache = sampler.generate(params, cache, hidden, [len(r) for r in PROMPTS], jax.random.PRNGKey(0), [12, 7, 12])
  np.testing.assert_array_equal(out.num_tokens, [12, 7, 12])
  np.testing.assert_array_equal(out.stop_reason, [sampling.LENGTH] * 3)
  np.testing.assert_array_equal(cache["length"], [6 + 12, 12 + 7, 1 + 12])
  sequences = [p + [int(t) for t in out.tokens[b, :out.num_tokens[b]]] for b, p in enumerate(PROMPTS)]
  reference = all_logits(params, sequences)
  for b, (prompt, seq) in enumerate(zip(PROMPTS, sequences)):
    # Teacher-forced: every generated token is the argmax after the sequence before it.
    predicted = np.asarray(jnp.argmax(reference[b, len(prompt) - 1:len(seq) - 1], axis=-1))
    np.testing.assert_array_equal(predicted, seq[len(prompt):])
    assert len(set(seq[len(prompt):])) > 2  # a real sequence, not one repeated token
    expected = jax.nn.log_softmax(reference[b, len(prompt) - 1:len(seq) - 1], axis=-1)
    expected = np.take_along_axis(np.asarray(expected), np.asarray(seq[len(prompt):])[:, None], -1)[:, 0]
    np.testing.assert_allclose(out.logps[b, :len(seq) - len(prompt)], expected, atol=1e-4)


def test_extend_equals_prefill(params, stop_table):
  sampler = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=0, max_new_tokens=4), stop_table)
  heads = [p[:3] for p in PROMPTS[:2]] + [PROMPTS[2]]
  tails = [p[3:] for p in PROMPTS[:2]] + [[11, 12, 13]]
  hidden, cache = prefill(sampler, params, heads)
  hidden, cache = sampler.extend(params, cache, sampling.text_chunk(tails, [len(h) for h in heads], 16))
  whole = [h + t for h, t in zip(heads, tails)]
  np.testing.assert_array_equal(cache["length"], [len(w) for w in whole])
  np.testing.assert_allclose(next_logits(params, hidden), full_logits(params, whole), atol=1e-4)
  one_shot, _ = prefill(sampler, params, whole)
  np.testing.assert_allclose(hidden, one_shot, atol=1e-4)


def test_stop_table_matches_tag_variants(tokenizer, stop_table):

  def stops(text_):
    ids = tokenizer.encode(text_)
    bits = np.zeros((stop_table.pattern_bits.shape[1],), np.int64)
    for i, t in enumerate(ids):
      bits = np.concatenate([bits[1:], [stop_table.token_bits[t]]])
      hit = np.all((bits[None] & stop_table.pattern_bits) == stop_table.pattern_bits, axis=1)
      if hit.any():
        return stop_table.strings[int(np.argmax(hit))], i == len(ids) - 1
    return None, False

  assert stops("<search> a query? </search>") == ("</search>", True)
  assert stops("what?</search>") == ("</search>", True)
  assert stops("x = 1\n```\n</code>\n") == ("</code>", True)
  assert stops("}</problem>") == ("</problem>", True)
  assert stops("<answer> 81.</answer>") == ("</answer>", True)
  assert stops("</think> and <search> still open") == (None, False)
  assert stops("search> no slash") == (None, False)


def test_stop_on_tag_eos_and_budget(params, tokenizer, stop_table):
  steps = 16
  eos = (tokenizer.im_end_id, tokenizer.end_of_text_id)
  sampler = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=1.0, max_new_tokens=steps, eos_ids=eos),
                             stop_table)
  scripts = [
      tokenizer.encode("<search> who? </search> more text"),
      tokenizer.encode("<answer> 3 </answer>") + [tokenizer.im_end_id] * 8,
      tokenizer.encode("one two three four five six seven"),
      tokenizer.encode("hi there") + [tokenizer.im_end_id, 5, 6]
  ]
  forced = np.full((4, steps), -1, np.int32)
  for b, s in enumerate(scripts):
    forced[b, :min(len(s), steps)] = s[:steps]
  rows = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
  hidden, cache = prefill(sampler, params, rows)
  out, cache = sampler.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(1),
                                [steps, steps, 5, steps], forced)
  search_len = len(tokenizer.encode("<search> who? </search>"))
  answer_len = len(tokenizer.encode("<answer> 3 </answer>"))
  np.testing.assert_array_equal(out.num_tokens, [search_len, answer_len, 5, 3])
  np.testing.assert_array_equal(out.stop_reason, [sampling.STOP_TAG, sampling.STOP_TAG, sampling.LENGTH, sampling.EOS])
  assert [stop_table.strings[i] if i >= 0 else None for i in np.asarray(out.stop_index)
         ] == ["</search>", "</answer>", None, None]
  np.testing.assert_array_equal(cache["length"], np.asarray([len(r) for r in rows]) + np.asarray(out.num_tokens))
  np.testing.assert_array_equal(out.next_positions, cache["length"])
  # Forced tokens carry their log-prob under the temperature-1 distribution, as sampled ones do.
  seq = rows[2] + scripts[2][:2]
  expected = jax.nn.log_softmax(full_logits(params, [seq])[0])[scripts[2][2]]
  np.testing.assert_allclose(out.logps[2, 2], expected, atol=1e-4)
  assert np.all(np.asarray(out.tokens)[2, 5:] == 0) and np.all(np.asarray(out.logps)[2, 5:] == 0)


def test_filters_restrict_the_support():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(256, 50)).astype(np.float32) * 3)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  no_force = jnp.full((256,), -1, jnp.int32)
  greedy, _ = sampling_draw.sample(logits, keys[0], sampling.SamplingConfig(temperature=0), no_force)
  np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
  tied = jnp.zeros((2, 7)).at[0, 3].set(1.0).at[0, 5].set(1.0)
  np.testing.assert_array_equal(sampling_draw.first_argmax(tied), [3, 0])
  top1, _ = sampling_draw.sample(logits, keys[1], sampling.SamplingConfig(temperature=1.0, top_k=1), no_force)
  np.testing.assert_array_equal(top1, greedy)
  nucleus, _ = sampling_draw.sample(logits, keys[2], sampling.SamplingConfig(temperature=1.0, top_p=1e-6), no_force)
  np.testing.assert_array_equal(nucleus, greedy)
  top3, logp = sampling_draw.sample(logits, keys[3], sampling.SamplingConfig(temperature=0.7, top_k=3), no_force)
  ranks = jnp.sum(logits > jnp.take_along_axis(logits, top3[:, None], -1), axis=-1)
  assert int(ranks.max()) <= 2 and int(ranks.max()) > 0
  np.testing.assert_allclose(logp,
                             jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7), top3[:, None], -1)[:, 0], atol=1e-5)
  # top_p=0.9 keeps the smallest prefix of the sorted distribution holding 90% of the mass.
  probs = jax.nn.softmax(logits, -1)
  sampled, _ = sampling_draw.sample(logits, keys[0], sampling.SamplingConfig(temperature=1.0, top_p=0.9), no_force)
  mass_above = jnp.sum(jnp.where(probs > jnp.take_along_axis(probs, sampled[:, None], -1), probs, 0), -1)
  assert float(mass_above.max()) < 0.9


def test_categorical_draws_from_the_softmax():
  rng = np.random.default_rng(0)
  logits = np.log(rng.dirichlet(np.ones(200))).astype(np.float32)
  logits[::7] = -np.inf  # never drawn
  batch = jnp.broadcast_to(jnp.asarray(logits), (100000, 200))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))

  def total_variation(draws):
    return 0.5 * np.abs(np.bincount(np.asarray(draws), minlength=200) / len(draws) - probs).sum()

  ours = sampling_draw.categorical(jax.random.PRNGKey(0), batch, block=64)
  assert np.all(np.asarray(ours) % 7 != 0)
  reference = total_variation(jax.random.categorical(jax.random.PRNGKey(1), batch))
  assert total_variation(ours) < 1.5 * reference + 0.005  # sampling noise only (~0.02 at 100k draws)
  one = sampling_draw.categorical(jax.random.PRNGKey(1), jnp.asarray([[0.0, -np.inf, -np.inf]]))
  assert np.all(np.asarray(one) == 0)


def test_sampling_is_seeded_and_spreads(params, stop_table):
  sampler = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=1.0, max_new_tokens=6, eos_ids=()), stop_table)
  rows = [PROMPTS[1]] * 4
  outs = []
  for seed in (0, 0, 1):
    hidden, cache = prefill(sampler, params, rows)
    out, _ = sampler.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(seed), [6] * 4)
    outs.append(np.asarray(out.tokens))
  np.testing.assert_array_equal(outs[0], outs[1])
  assert len({tuple(r) for r in outs[0]}) > 1  # rows of one prompt draw different samples
  assert not np.array_equal(outs[0], outs[2])


def test_no_recompiles_after_warmup_and_cache_donated(params, stop_table):
  sampler = sampling.Sampler(CFG, sampling.SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=8), stop_table)
  for i, (rows, budget) in enumerate([(PROMPTS, [8, 8, 8]), ([[5, 6], [7], [8, 9, 10, 11]], [3, 0, 8]),
                                      ([[1] * 20, [2] * 3, [3]], [1, 2, 8])]):
    cache = sampler.new_cache(3, 96)
    hidden, new_cache = sampler.extend(params, cache, sampling.text_chunk(rows, [0] * 3, 32))
    assert cache["k"].is_deleted()
    out, newer = sampler.generate(params, new_cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(i), budget)
    assert new_cache["k"].is_deleted()
    sampler.extend(params, newer, sampling.text_chunk([[1, 2]] * 3, np.asarray(out.next_positions), 32))
    if i == 0:
      warm = sampler.compile_count()
  assert sampler.compile_count() == warm


def test_bucket():
  assert sampling.bucket(5, (8, 4, 16)) == 8
  assert sampling.bucket(16, (8, 16)) == 16
  with pytest.raises(ValueError, match="largest bucket 16"):
    sampling.bucket(17, (8, 16))
  assert sampling.bucket(17, (8, 16), beyond="multiple") == 32


def test_config_errors():
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingConfig(top_p=0)
  with pytest.raises(ValueError, match="temperature"):
    sampling.SamplingConfig(temperature=-1)


_MESH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import AxisType
    from varft import sampling, turns
    from varft.models.qwen25vl import config as config_lib, text
    from varft.processing import chat
    cfg = config_lib.get_config("tiny")
    params = {"text": text.init_params(jax.random.PRNGKey(0), cfg.text)}
    table = sampling.make_stop_table(chat.load_tokenizer(), cfg.text.vocab_size, turns.AGENT_STOP_TAGS)
    rows = [[9707, 11, 1879], [785, 6722], [40], [1, 2, 3, 4]]
    outs = []
    for mesh in (None, jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))):
      s = sampling.Sampler(cfg, sampling.SamplingConfig(temperature=0, max_new_tokens=6), table, mesh=mesh)
      hidden, cache = s.extend(params, s.new_cache(4, 32), sampling.text_chunk(rows, [0] * 4, 8))
      out, cache = s.generate(params, cache, hidden, [len(r) for r in rows], jax.random.PRNGKey(0), [6] * 4)
      outs.append(np.asarray(out.tokens))
      if mesh is not None:
        assert len(cache["k"].sharding.device_set) == 4, cache["k"].sharding
        assert cache["k"].sharding.spec[1] == "data", cache["k"].sharding
    np.testing.assert_array_equal(outs[0], outs[1])
    # The rollout engine on the same mesh: 3 trajectories padded to 4 device rows, the batch holds the real 3.
    from varft import rollout
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    config = rollout.RolloutConfig(mode="multiturn", max_turns=1, max_new_tokens=6, max_total_tokens=512,
                                   length_buckets=(512,), temperature=0.0)
    engine = rollout.RolloutEngine(cfg, chat.load_tokenizer(), None, config, mesh=mesh, stop_table=table)
    examples = [{"id": str(i), "task": "search", "question": "Q" * (i + 1), "images": []} for i in range(3)]
    result = engine.run(params, examples, jax.random.PRNGKey(0))
    assert result.batch["tokens"].shape == (3, 512), result.batch["tokens"].shape
    assert result.batch["loss_mask"].sum() == 3 * 6
    print("OK")
""")


def test_batch_sharded_over_a_mesh():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_rows_and_cache_split_over_all_8_devices_with_the_1_device_tokens():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run([sys.executable, "-m", "tests.sampling.mesh_script"], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  cases = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("CASE")]
  # (layers, rows, slots, kv heads, head dim) per device: 8 rows over 8 devices; with tp=2 heads split in two.
  assert cases == [
      ["fsdp8", "tp=1", "equal=True", "cache=2x1x32x2x16", "tokens=1", "weights=P(None,None,None)"],
      ["data2xfsdp4", "tp=1", "equal=True", "cache=2x1x32x2x16", "tokens=1", "weights=P(None,None,None)"],
      ["fsdp8", "tp=2", "equal=True", "cache=2x2x32x1x16", "tokens=2", "weights=P(None,None,'tensor')"],
      # 4-way: the 2 KV heads do not split 4 ways, so K/V (and their cache) stay whole within a tensor group.
      ["fsdp8", "tp=4", "equal=True", "cache=2x4x32x2x16", "tokens=4", "weights=P(None,None,'tensor')"],
  ], result.stdout
  # Fresh train params resharded to tp=2 bf16 sampling weights and sampled, 3 times: every compile is in step 1.
  compiles = [int(n) for line in result.stdout.splitlines() if line.startswith("COMPILES") for n in line.split()[1:]]
  assert len(compiles) == 3 and compiles[0] > 0 and compiles[0] == compiles[1] == compiles[2], result.stdout


def test_cdf_block_divides_the_vocabulary_when_it_can():
  assert sampling_draw.cdf_block(151936) == 128  # 2**7 * 1187: no padding copy of the (B, V) logits
  assert sampling_draw.cdf_block(50) == 50
  assert sampling_draw.cdf_block(3) == 256  # no divisor in range: pad
  logits = jax.random.normal(jax.random.PRNGKey(0), (4, 151936)) * 3
  token, logp = sampling_draw.sample(logits, jax.random.PRNGKey(1), sampling.SamplingConfig(temperature=0.7),
                                     jnp.full((4,), -1, jnp.int32))
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7, axis=-1), token[:, None], axis=-1)[:, 0]
  np.testing.assert_allclose(logp, expected, atol=1e-5)
