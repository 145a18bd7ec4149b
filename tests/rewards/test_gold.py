"""Gold injection (the paper's coding trainer) and the paper's scoring text (special tokens skipped)."""
import numpy as np
import pytest

from varft import agent_task, rewards
from varft import rollout as rollout_lib
from varft.processing import chat

G = 8
PROBLEM_GT = "<think> Too dark. </think>\n<problem> {'dark'} </problem>"
ANSWER_GT = "<think> It reads OPEN. </think>\n<answer> OPEN </answer>"
CONFIG = {"rewards": [("accuracy", 1.0), ("format", 1.0)], "reward_options": {"task": "coding"}}


def _group_ids(groups):
  return [g for g in range(groups) for _ in range(G)]


def test_exactly_one_row_per_group_is_scored_as_the_gt_and_the_draw_is_seeded():
  samples = [f"<think> sample {i} </think><problem> {{'blur'}} </problem>" for i in range(3 * G)]
  golds = [PROBLEM_GT] * G + [ANSWER_GT] * G + [""] * G  # the third group's records have no gt
  texts, injected, missing = rewards.inject_gold(samples, golds, _group_ids(3), np.random.default_rng(7))
  assert missing == 1
  assert injected.reshape(3, G).sum(axis=1).tolist() == [1, 1, 0]
  for i, (text, sample, gold, hit) in enumerate(zip(texts, samples, golds, injected)):
    assert text == (gold if hit else sample), i
  again = rewards.inject_gold(samples, golds, _group_ids(3), np.random.default_rng(7))[1]
  np.testing.assert_array_equal(again, injected)
  draws = {
      tuple(np.flatnonzero(rewards.inject_gold(samples, golds, _group_ids(3), np.random.default_rng(s))[1]))
      for s in range(20)
  }
  assert len(draws) > 5  # uniform over the group, not a fixed row


def test_the_injected_row_gets_the_references_reward():
  samples = ["<think> x </think><problem> {'blur'} </problem>"] * G  # wrong problem: accuracy 0, format 1
  refs = [{"solution": "<problem> {'dark'} </problem>"}] * G
  texts, injected, _ = rewards.inject_gold(samples, [PROBLEM_GT] * G, _group_ids(1), np.random.default_rng(0))
  total, components = rewards.score_batch(texts, refs, CONFIG)
  gold_total, _ = rewards.score_batch([PROBLEM_GT], refs[:1], CONFIG)
  assert float(gold_total[0]) == 2.0  # the gt scores full format and accuracy
  np.testing.assert_array_equal(total, np.where(injected, gold_total[0], 1.0))
  np.testing.assert_array_equal(components["accuracy"], injected.astype(np.float32))


def _result(tokenizer, texts, groups):
  """A rollout result whose batch rows hold `texts` as sampled tokens after a two-token prompt."""
  rows = [[1, 2] + tokenizer.encode(t) for t in texts]
  length = max(map(len, rows))
  tokens, loss_mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
  transcripts = []
  for i, (row, text) in enumerate(zip(rows, texts)):
    tokens[i, :len(row)], loss_mask[i, 2:len(row)] = row, 1
    transcripts.append(
        rollout_lib.Transcript(str(groups[i]), groups[i], i % G, messages=[{
            "role": "assistant",
            "text": text
        }]))
  return rollout_lib.RolloutResult({"tokens": tokens, "loss_mask": loss_mask}, transcripts, {})


def test_scoring_hook_replaces_text_only_and_skips_special_tokens_as_the_released_trainer():
  tokenizer = chat.load_tokenizer()
  sampled = [f"<think> s{i} </think><answer> CLOSED </answer>{chat.IM_END}" for i in range(G)]
  result = _result(tokenizer, sampled, _group_ids(1))
  before = {k: v.copy() for k, v in result.batch.items()}
  examples = [{"gt": ANSWER_GT}] * G
  refs = [{"solution": "<answer> OPEN </answer>"}] * G

  raw = rewards.RewardOptions(task="coding")
  texts, injected, _ = agent_task.scored_completions(result, examples, raw, tokenizer, np.random.default_rng(0))
  assert texts == sampled and not injected.any()
  # Generated to EOS, the text ends with <|im_end|>: a fullmatch format fails on it unless it is skipped.
  assert rewards.score_batch(texts, refs, CONFIG)[1]["format"].tolist() == [0.0] * G

  paper = rewards.RewardOptions(task="coding", gold_injection=True, skip_special_tokens=True)
  texts, injected, missing = agent_task.scored_completions(result, examples, paper, tokenizer, np.random.default_rng(0))
  assert missing == 0 and injected.sum() == 1
  assert [t for t, hit in zip(texts, injected) if not hit
         ] == [s.removesuffix(chat.IM_END) for s, hit in zip(sampled, injected) if not hit]
  assert texts[int(np.flatnonzero(injected)[0])] == ANSWER_GT
  total, components = rewards.score_batch(texts, refs, CONFIG)
  assert components["format"].tolist() == [1.0] * G
  np.testing.assert_array_equal(total, np.where(injected, 2.0, 1.0))
  for k, v in result.batch.items():  # the tokens (and so the gradient) stay the samples'
    np.testing.assert_array_equal(v, before[k])


def test_gold_options_are_reward_options():
  options = rewards.options_from_config({"reward_options": {"gold_injection": True, "skip_special_tokens": True}})
  assert options.gold_injection and options.skip_special_tokens
  with pytest.raises(ValueError, match="inject_gold: 2 completions, 1 golds"):
    rewards.inject_gold(["a", "b"], ["g"], [0, 0], np.random.default_rng(0))


@pytest.mark.parametrize(
    "task, text, expected",
    [
        ("coding", "<think> a </think><answer> OPEN </answer>", 1.0),
        ("coding", "<think> a </think><answer> OPEN </answer> Hope this helps.", 0.0),  # text after the action
        ("coding", "<think> a </think><answer> OPEN </answer>\n", 0.0),  # even a newline: fullmatch
        ("search", "<think> a </think>\n<search> a query </search> then I will answer", 0.0),
        ("search", "<think> a </think>\n<search> a query </search>", 1.0),
    ])
def test_text_after_the_action_costs_the_format_as_the_released_fullmatch(task, text, expected):
  """Generated to EOS, a turn can run on past its action (a closing-tag stop never lets it); the format reward
  is the released `re.fullmatch(pattern, content, re.DOTALL)` on the text without special tokens."""
  import re
  pattern = {
      "coding": r"<think>.*?</think>\s*<answer>.*?</answer>",
      "search": r"<think>.*?</think>\s*<search>.*?</search>"
  }[task]
  assert float(re.fullmatch(pattern, text, re.DOTALL) is not None) == expected
  solution = "<answer> OPEN </answer>" if task == "coding" else "<search> a query </search>"
  config = {"rewards": [("format", 1.0)], "reward_options": {"task": task}}
  _, components = rewards.score_batch([text], [{"solution": solution}], config)
  assert float(components["format"][0]) == expected
