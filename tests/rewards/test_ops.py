"""The jitted batch ops equal the plain-Python paper rules, and the reward API behaves."""
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import ml_collections
import numpy as np
import pytest

from tests.rewards import strategies
from tests.rewards.conftest import FakeEmbedder
from varft import rewards
from varft.eval import metrics
from varft.rewards import reference

ALL_STEP_REWARDS = (("accuracy", 1.0), ("format", 1.0), ("answer_f1", 1.0), ("answer_em", 1.0),
                    ("answer_squad_f1", 1.0), ("query_similarity", 1.0), ("code_step", 1.0), ("problem_match", 1.0))
# Pinned buckets: every hypothesis batch compiles to the same shapes.
PINNED = {"batch": 32, "events": 128, "pred_words": 64, "gold_words": 32, "golds": 4, "problems": 32}


def _reference_scores(text, task, ref, embedder):
  if "solution" in ref:
    sol = ref["solution"]
    step = reference.step_type_of(sol, task)
    answers, query, problems = [reference.extract_tag(sol, "answer")], reference.extract_tag(sol, "search"), \
        reference.extract_problems(sol)
  else:
    step, answers, query, problems = ref["step_type"], ref.get("answers", []), ref.get("query", ""), \
        ref.get("problems", [])
  ok = step is not None and not any(t in text for t in reference.FORBIDDEN_TAGS[(task, step)])
  pred = reference.extract_tag(text, "answer")
  on_answer = lambda fn: max((fn(pred, g) for g in answers), default=0.0) if ok and step == "answer" else 0.0
  return {
      "accuracy": reference.accuracy_reward(text, task, step, answers=answers, query=query, problems=problems,
                                            similarity=embedder.similarity),
      "format": reference.format_reward(text, task, step),
      "answer_f1": on_answer(metrics.f1_score),
      "answer_em": on_answer(metrics.exact_match),
      "answer_squad_f1": on_answer(metrics.squad_f1_score),
  }


def _score(texts, refs, task="search", **options):
  """All step rewards with the property test's weights and buckets (one shared compilation)."""
  arrays = rewards.prepare_reward_inputs(texts, refs, names=[n for n, _ in ALL_STEP_REWARDS], embedder=FakeEmbedder(),
                                         options=rewards.RewardOptions(task=task, **options), bucket_mins=PINNED)
  _, comps = rewards.compute_rewards(arrays, ALL_STEP_REWARDS)
  return None, {k: np.asarray(v)[:len(texts)] for k, v in comps.items()}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(strategies.samples(), min_size=8, max_size=32))
def test_jitted_ops_equal_paper_rules(batch):
  embedder = FakeEmbedder()
  texts = [text for text, _, _ in batch]
  refs = [ref for _, _, ref in batch]
  arrays = rewards.prepare_reward_inputs(texts, refs, names=[n for n, _ in ALL_STEP_REWARDS], embedder=embedder,
                                         bucket_mins=PINNED)
  total, comps = rewards.compute_rewards(arrays, ALL_STEP_REWARDS)
  for i, (text, task, ref) in enumerate(batch):
    expected = _reference_scores(text, task, ref, embedder)
    for name, value in expected.items():
      assert comps[name][i] == pytest.approx(value, abs=1e-5), (name, text, ref)
  parts = sum(np.asarray(comps[n]) for n in ("query_similarity", "code_step", "problem_match", "answer_f1"))
  np.testing.assert_allclose(comps["accuracy"], parts, atol=1e-6)
  np.testing.assert_allclose(total, sum(np.asarray(v) for v in comps.values()), atol=1e-5)


ADVERSARIAL = (
    "",
    "<think></think><answer></answer>",
    "<think>a</think><answer>x<answer></answer>",
    "<think>a<think></think><answer>x</answer>",
    "<think><answer>a</think><answer>x</answer>",
    "<think>a</think><answer>x</answer></answer>",
    "<think>a</think></think><answer>x</answer>",
    "<think>a</think><answer><search>q</search></answer>",
    "<think>a</think><search>q</search><answer>x</answer>",
    "<think>a</think><search>q</answer><answer></search>",
    "<think>a</think> \n <answer>x</answer>",
    "<think>a</think>\u3000<answer>x</answer>",
    "<think>a</think>\u200b<answer>x</answer>",
    "<think>a</think><answer>x\n</answer>",
    "<think>a</think><answer>x</answer>\n",
    "<think>a</think><problem>{''}</problem>",
    "<think>a</think><problem>{'a''b'}</problem>",
    "<think>a</think><problem>{'a',}</problem>",
    "<think>a</think><problem> { 'dark' , 'blur' }\n</problem>",
    "<think>a</think><problem>{'rotation90\n'}</problem>",
    "<think>a</think><problem>{'}'}</problem>",
    "<think>a</think><problem>{'dark'}</problem><problem>",
    "<think>a</think><problem>{'rotation90'}</problem>",
    "<think>a</think><code>```python```</code>",
    "<think>a</think><code>``` python```</code>",
    "<think>a</think><code> ```python\n```x</code>",
    "<think>a</think><code>```python</code>",
    "<think>a</think><code>```python x```</code><code>",
    "<think>a</think><code>````python x```</code>",
    "<think>思考</think><answer>巴黎，法国</answer>",
    "<think>a</think><answer>Play <b>well</b></answer>",
)


def test_adversarial_completions_equal_paper_rules():
  solutions = {
      "answer": "<think>r</think><answer>Play well</answer>",
      "search": "<think>r</think><search>q</search>",
      "code": "<think>r</think><code>```python\nx\n```</code>",
      "problem": "<think>r</think><problem>{'rotation90', 'dark'}</problem>"
  }
  cases = [(text, task, {
      "solution": solutions[step],
      "task": task
  }) for text in ADVERSARIAL for task, steps in reference.STEP_TYPE_PRIORITY.items() for step in steps]
  for start in range(0, len(cases), PINNED["batch"]):
    chunk = cases[start:start + PINNED["batch"]]
    _, comps = _score([c[0] for c in chunk], [c[2] for c in chunk])  # each reference names its task
    for i, (text, task, ref) in enumerate(chunk):
      expected = _reference_scores(text, task, ref, FakeEmbedder())
      assert comps["format"][i] == expected["format"], (text, ref)
      assert comps["accuracy"][i] == pytest.approx(expected["accuracy"], abs=1e-6), (text, ref)


def test_pinned_buckets_compile_once():
  texts = ["<think>a</think><answer>x</answer>", "<think>b</think><search>q</search>"]
  refs = [{"step_type": "answer", "answers": ["x"]}, {"step_type": "search", "query": "q"}]
  sizes = []
  for n in (1, 2, 5):
    arrays = rewards.prepare_reward_inputs((texts * 3)[:n], (refs * 3)[:n], names=[n for n, _ in ALL_STEP_REWARDS],
                                           embedder=FakeEmbedder(), bucket_mins=PINNED)
    rewards.compute_rewards(arrays, ALL_STEP_REWARDS)
    sizes.append(rewards._compute._cache_size())
  assert sizes[0] == sizes[1] == sizes[2]


def test_answer_rewards_by_hand():
  refs = [{"step_type": "answer", "answers": ["cat cat dog", "bird"]}]
  _, c = _score(["<think>.</think><answer>The cat, cat!</answer>"], refs)
  assert c["answer_f1"][0] == pytest.approx(0.4)  # set: 1 common, P=1/2, R=1/3
  assert c["answer_squad_f1"][0] == pytest.approx(0.8)  # multiset: 2 common, P=1, R=2/3
  assert c["answer_em"][0] == 0.0
  _, c = _score(["<think>.</think><answer>Bird.</answer>"], refs)
  assert c["answer_em"][0] == 1.0 and c["answer_f1"][0] == 1.0


def test_wrong_action_tag_zeroes_accuracy_but_not_format_in_search_task():
  ref = [{"solution": "<think>r</think><answer>Paris</answer>"}]
  text = "<think>try <search></think><answer>Paris</answer>"
  _, c = _score([text], ref)
  assert c["accuracy"][0] == 0.0 and c["format"][0] == 1.0


def test_repeated_tags_void_format():
  ref = [{"step_type": "answer", "answers": ["x"]}]
  _, c = _score(["<think>a</think><answer>x</answer><answer>", "<think>a</think><answer>x</answer>"], ref * 2)
  np.testing.assert_array_equal(c["format"], [0.0, 1.0])


def test_problem_partial_credit_follows_the_paper():
  gold = "<think>r</think><problem>{'rotation90', 'dark'}</problem>"
  both = "<think>r</think><problem>{'rotation90', 'rotation180'}</problem>"
  texts = [
      "<think>.</think><problem>{'rotation90'}</problem>", "<think>.</think><problem>{'dark'}</problem>",
      "<think>.</think><problem>{'dark','rotation90'}</problem>", "<think>.</think><problem>{'rotation180'}</problem>",
      "<think>.</think><problem>{'rotation180'}</problem>"
  ]
  refs = [{"solution": gold}] * 3 + [{"solution": both}, {"step_type": "problem", "problems": ["dark", "blur"]}]
  _, c = _score(texts, refs, task="coding")
  # rotation90 alone earns half; with both rotations in the gold set only rotation90 is checked (if/elif).
  np.testing.assert_array_equal(c["problem_match"], [0.5, 0.0, 1.0, 0.0, 0.0])


def test_code_step_constant_and_format():
  ref = [{"step_type": "code"}]
  good = "<think>fix</think>\n<code>\n```python\nimport cv2\n```\n</code>"
  _, c = _score([good, good.replace("```\n</code>", "</code>")], ref * 2, task="coding")
  np.testing.assert_allclose(c["code_step"], [0.9, 0.9])
  np.testing.assert_array_equal(c["format"], [1.0, 0.0])


def test_query_similarity_threshold(fake_embedder):
  refs = [{"step_type": "search", "query": "lego brand meaning"}] * 2
  texts = ["<think>.</think><search>lego brand meaning</search>", "<think>.</think><search>zzzz qqq</search>"]
  _, c = _score(texts, refs)
  assert c["query_similarity"][0] == pytest.approx(1.0, abs=1e-6)
  expected = fake_embedder.similarity("zzzz qqq", "lego brand meaning")
  assert c["query_similarity"][1] == (pytest.approx(expected) if expected >= 0.5 else 0.0)
  _, c = _score(texts, refs, similarity_threshold=1.01)
  assert c["query_similarity"][0] == 0.0


def test_multiturn_outcome_rewards_use_tool_stats():
  texts = ["<think>done</think><answer>Paris</answer>"] * 3
  refs = [{"step_type": "answer", "answers": ["Paris"]}] * 3
  stats = {
      "num_calls": [2, 3, 0],
      "num_failed": [0, 2, 0],
      "all_valid": [True, False, True],
      "num_code_success": [1, 0, 0]
  }
  config = ml_collections.ConfigDict(
      {"rewards": [("answer_f1", 1.0), ("tool_validity", 0.2), ("failed_calls", 0.1), ("code_success", 0.5)]})
  total, c = rewards.score_batch(texts, refs, config, tool_stats=stats)
  np.testing.assert_allclose(c["failed_calls"], [0, -2, 0])
  np.testing.assert_allclose(c["tool_validity"], [1, 0, 1])
  np.testing.assert_allclose(c["code_success"], [1, 0, 0])
  np.testing.assert_allclose(total, [1 + 0.2 + 0.5, 1 - 0.2, 1 + 0.2])


def test_padding_rows_score_zero_and_ops_are_vmappable():
  arrays = rewards.prepare_reward_inputs(["<think>a</think><answer>x</answer>"], [{
      "step_type": "answer",
      "answers": ["x"]
  }], names=[n for n, _ in ALL_STEP_REWARDS], embedder=FakeEmbedder(), bucket_mins=PINNED)
  total, _ = rewards.compute_rewards(arrays, ALL_STEP_REWARDS)
  assert total.shape == (32,) and float(total[0]) == 5.0 and not np.asarray(total[1:]).any()
  # A batch op vmaps over an extra leading axis (e.g. groups of trajectories).
  stacked = jax.tree.map(lambda a: np.stack([a, a]) if np.ndim(a) else a, arrays)
  in_axes = ({k: (None if np.ndim(v) == 0 else 0) for k, v in stacked.items()},)
  nested = jax.jit(jax.vmap(rewards.ops.batch_op("format"), in_axes=in_axes))(stacked)
  assert nested.shape == (2, 32) and float(nested[1, 0]) == 1.0 and not np.asarray(nested[:, 1:]).any()


def test_very_long_completion_matches_reference():
  text = "<think>" + "long thought, 'quoted' {x} " * 800 + "</think>\n<answer>" + "Play well " * 300 + "</answer>"
  ref = {"step_type": "answer", "answers": ["play well"]}
  _, c = rewards.score_batch([text], [ref],
                             ml_collections.ConfigDict({"rewards": [("format", 1.0), ("answer_f1", 1.0)]}))
  assert c["format"][0] == reference.format_reward(text, "search", "answer") == 1.0
  assert c["answer_f1"][0] == pytest.approx(metrics.f1_score(reference.extract_tag(text, "answer"), "play well"))


def test_reward_spec_forms():
  expected = (("accuracy", 1.0), ("format", 0.5))
  assert rewards.reward_weights([("accuracy", 1), ("format", 0.5)]) == expected
  assert rewards.reward_weights(ml_collections.ConfigDict({"r": {"accuracy": 1.0, "format": 0.5}}).r) == expected
  with pytest.raises(ValueError, match="must be \\(name, weight\\) pairs"):
    rewards.reward_weights(["accuracy"])


def test_config_errors_are_clear():
  config = lambda names: ml_collections.ConfigDict({"rewards": [(n, 1.0) for n in names]})
  with pytest.raises(ValueError, match="unknown or no rewards"):
    rewards.score_batch(["x"], [{"step_type": "answer"}], config(["answer_f2"]))
  with pytest.raises(ValueError, match="tool_stats"):
    rewards.score_batch(["x"], [{"step_type": "answer"}], config(["failed_calls"]))
  with pytest.raises(ValueError, match="step_type must be one of"):
    rewards.score_batch(["x"], [{"step_type": "dance"}], config(["format"]))
  with pytest.raises(ValueError, match="reward task"):
    rewards.RewardOptions(task="chess")
  with pytest.raises(ValueError, match=r"unknown reward_options \['threshold'\]"):
    rewards.options_from_config(ml_collections.ConfigDict({"reward_options": {"threshold": 0.4}}))
  with pytest.raises(ValueError, match="2 completions but 1 references"):
    rewards.score_batch(["x", "y"], [{"step_type": "answer"}], config(["format"]))
