"""Tag events and the format DFAs agree with the paper's regular expressions."""
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.rewards import strategies
from varft.rewards import reference, tags

PATTERNS = {
    "answer": reference.ANSWER_PATTERN,
    "search": reference.SEARCH_PATTERN,
    "code": reference.CODE_PATTERN,
    "problem": reference.PROBLEM_PATTERN
}


def _dfa_accepts(text):
  transitions, accepting = tags.format_tables()
  events = tags.text_to_events(text)
  return {name: tags.run_dfa(transitions[k], accepting[k], events) for k, name in enumerate(tags.FORMAT_PATTERNS)}


def _regex_accepts(text):
  return {name: re.fullmatch(p, text, re.DOTALL) is not None for name, p in PATTERNS.items()}


def test_events_of_a_search_step():
  assert tags.text_to_events("<think>why</think>\n<search>lego, meaning</search>") == [
      tags.OPEN["think"], tags.TEXT, tags.CLOSE["think"], tags.WS, tags.OPEN["search"], tags.TEXT, tags.COMMA,
      tags.TEXT, tags.CLOSE["search"]
  ]


def test_longest_special_wins_and_unicode_whitespace_is_ws():
  assert tags.text_to_events("```python````") == [tags.FENCE_PY, tags.FENCE, tags.TEXT]
  assert tags.text_to_events("\u3000\xa0\n") == [tags.WS]
  assert tags.text_to_events("<thinking>") == [tags.TEXT]


def test_each_pattern_accepts_its_canonical_step_only():
  cases = {
      "answer": "<think>a</think> <answer>b</answer>",
      "search": "<think>a</think>\n<search>q</search>",
      "code": "<think>a</think><code>\n```python\nimport cv2\n```\n</code>",
      "problem": "<think>a</think><problem> {'dark', 'blur'} </problem>",
  }
  for name, text in cases.items():
    assert _dfa_accepts(text) == {k: k == name for k in PATTERNS}, name


def test_dfa_tables_pad_is_identity_and_dead_states_absorb():
  transitions, _ = tags.format_tables()
  states = transitions.shape[1]
  assert (transitions[:, :, tags.PAD] == range(states)).all()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(strategies.completions)
def test_dfa_equals_paper_regex(text):
  assert _dfa_accepts(text) == _regex_accepts(text)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from("<>/{}',` \n\u3000thinkswerpoblmcdy猫"), max_size=60))
def test_dfa_equals_paper_regex_on_tag_alphabet(text):
  assert _dfa_accepts(text) == _regex_accepts(text)


def test_whitespace_events_agree_with_regex_whitespace_on_every_code_point():
  chars = "".join(chr(i) for i in range(0x110000) if not 0xD800 <= i < 0xE000)
  regex_ws = set(re.findall(r"\s", chars))
  assert {ch for ch in regex_ws if tags.text_to_events(ch) != [tags.WS]} == set()
  assert len(regex_ws) == sum(1 for ch in chars if not ch.strip())
