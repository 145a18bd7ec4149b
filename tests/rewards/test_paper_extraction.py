"""Answer and problem extraction as the released code does it: answers without DOTALL (a multi-line answer is not
matched), `<problem>` lists sorted; cases where the DOTALL / unsorted reading would score differently."""
import re

import numpy as np
import pytest

from varft import rewards
from varft.eval import metrics
from varft.rewards import reference

CONFIG = {"rewards": [("accuracy", 1.0)], "reward_options": {"task": "coding"}}


def _official_answer_f1(content, gold, flags=0):
  """grpo_agent_code.py's answer rule, written from its text: search `<answer>(.*?)</answer>`, else the whole
  completion, then the set-F1."""
  match = re.search(r"<answer>(.*?)</answer>", content, flags)
  return metrics.f1_score(match.group(1).strip() if match else content.strip(), gold)


@pytest.mark.parametrize("content", [
    "<think> t </think><answer> big red\nbus </answer>",
    "<think> t </think>\n<answer>\nbig red bus\n</answer>",
    "<think> the bus is red </think><answer> big\nbus </answer> <answer> red </answer>",
])
def test_answers_are_extracted_without_dotall(content):
  gold = "big red bus"
  paper, dotall = _official_answer_f1(content, gold), _official_answer_f1(content, gold, re.DOTALL)
  assert paper != dotall  # the cases where the flag matters
  _, components = rewards.score_batch([content], [{"solution": f"<answer> {gold} </answer>"}], CONFIG)
  np.testing.assert_allclose(components["accuracy"][0], paper, rtol=1e-6)


def test_problem_lists_are_sorted_before_comparing():
  content = "<think> t </think><problem> {'rotation90', 'dark'} </problem>"
  assert reference.extract_problems(content) == ["dark", "rotation90"]
  _, components = rewards.score_batch([content], [{"solution": "<problem> {'dark', 'rotation90'} </problem>"}], CONFIG)
  assert float(components["accuracy"][0]) == 1.0  # unsorted, ['rotation90', 'dark'] != ['dark', 'rotation90']


def test_eval_answer_is_the_released_loops_single_line_answer():
  assert reference.eval_answer("<think> t </think><answer>  Paris </answer>") == "Paris"
  assert reference.eval_answer("<think> t </think><answer> Paris,\nFrance </answer>") is None
  assert reference.eval_answer("<answer>a</answer><answer>b</answer>") == "a"
  assert reference.eval_answer("no tag") is None
