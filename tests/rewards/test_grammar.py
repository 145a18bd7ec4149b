"""The one tag grammar (varft.tags): its patterns, its content finder, and that no module keeps its own copy."""
import ast
import pathlib
import re

import pytest

from varft import actions, paper_rules, prompts, tags
from varft.data import records
from varft.rewards import host, ops, reference
from varft.tools import code

VARFT = pathlib.Path(tags.__file__).parent
_REGEX_CALLS = {"compile", "search", "match", "fullmatch", "findall", "finditer", "sub", "subn", "split"}
_TAG_IN_PATTERN = re.compile(r"</?(?:\{\w+\}|" + "|".join(tags.TAGS) + r")>|<\(")


def _regex_literals_with_tags(source: str) -> list[str]:
  """Tag-reading regex literals in `source`: re.<call>(pattern, ...) whose pattern names a tag, and string constants
  that are tag regexes (a tag next to a `.*?` or `\\s*`)."""
  found, tree = [], ast.parse(source)
  docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}  # docstrings show tags as prose
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REGEX_CALLS and
        isinstance(node.func.value, ast.Name) and node.func.value.id == "re" and node.args):
      pattern = ast.unparse(node.args[0])
      if _TAG_IN_PATTERN.search(pattern):
        found.append(pattern)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
      if _TAG_IN_PATTERN.search(node.value) and re.search(r"\.\*\?|\\s\*", node.value):
        found.append(node.value)
  return found


def test_the_scanner_finds_a_module_s_own_tag_regex():
  own_copy = 'import re\n_ANSWER = re.compile(r"<answer>\\s*(.*?)\\s*</answer>")\nP = r"<think>.*?</think>"\n'
  assert len(_regex_literals_with_tags(own_copy)) == 3  # the call, its pattern constant, the bare pattern
  assert _regex_literals_with_tags('re.search(rf"<{tag}>(.*?)</{tag}>", s)')
  assert not _regex_literals_with_tags('x = "<answer>" in text\nre.compile(r"[A-Za-z]+")')


def test_no_module_but_the_grammar_declares_a_tag_regex():
  offenders = {}
  for path in sorted(VARFT.rglob("*.py")):
    found = _regex_literals_with_tags(path.read_text())
    if found and path != VARFT / "tags.py":
      offenders[str(path.relative_to(VARFT))] = found
  assert offenders == {}


def test_modules_use_the_grammar_objects():
  assert records.DEGRADATIONS is tags.DEGRADATIONS and host.PROBLEM_TYPES is tags.DEGRADATIONS
  assert actions.ACTION_TAGS is tags.ACTION_TAGS
  assert (ops.ROTATION90, ops.ROTATION180) == (0, 1) == tuple(map(tags.DEGRADATIONS.index, tags.ROTATIONS))
  assert reference.ROTATIONS == ("rotation90", "rotation180")
  assert "<problem> Describe the image issue from " + tags.problem_set_text() + " </problem>" in prompts.CODING_AGENT
  assert tags.problem_set_text() == ("{'rotation90', 'rotation180', 'dark', 'overexposure', 'blur', 'noise', "
                                     "'crop', 'none'}")


def test_the_released_scripts_patterns_are_their_exact_text():
  # Copied from Visual-ARFT's eval loops and trainers (grpo_agent_search.py, the coding trainer and eval scripts).
  assert tags.PAPER_ANSWER_RE.pattern == r"<answer>\s*(.*?)\s*</answer>" and not tags.PAPER_ANSWER_RE.flags & re.S
  assert tags.PAPER_SEARCH_RE.pattern == r"<search>\s*(.*?)\s*</search>" and not tags.PAPER_SEARCH_RE.flags & re.S
  assert tags.PAPER_PROBLEM_RE.pattern == r"<problem>\s*\{(.*?)\}\s*</problem>" and tags.PAPER_PROBLEM_RE.flags & re.S
  assert tags.PAPER_CODE_RE.pattern == r"<code>\s*```python(.*?)```.*?</code>"
  assert tags.PAPER_QUOTED_RE.pattern == r"'([^']+)'"
  assert tags.PAPER_FORMAT_PATTERNS == {
      "answer": r"<think>.*?</think>\s*<answer>.*?</answer>",
      "search": r"<think>.*?</think>\s*<search>.*?</search>",
      "code": r"<think>.*?</think>\s*<code>\s*```python(.*?)```.*?</code>",
      "problem": r"^<think>.*?</think>\s*<problem>\s*\{\s*'[^']+'\s*(?:,\s*'[^']+'\s*)*\}\s*</problem>$",
  }
  assert reference.ANSWER_PATTERN is tags.PAPER_FORMAT_PATTERNS["answer"]


def test_content_reads_one_line_or_many():
  text = "<think>a\nb</think><answer> two\nlines </answer><answer>x</answer>"
  assert tags.content(text, "think") == "a\nb"
  assert tags.content(text, "answer") == " two\nlines "
  assert tags.content(text, "answer", multiline=False) == "x"  # the trainers' re.search without DOTALL
  assert tags.content(text, "search") is None
  assert tags.content("<query> q </query> rest", "query") == " q "
  assert tags.tag_re("code") is tags.tag_re("code")  # compiled once
  with pytest.raises(ValueError, match="unknown tag 'tool'"):
    tags.content("<tool>x</tool>", "tool")


def test_lenient_and_exact_readings_differ_where_they_should():
  turn = "<think>t</think><code>\n```py\nprint(1)\n```\n</code>"
  assert tags.ACTION_RE.search(turn).group(1) == "code"
  assert tags.FENCE_RE.search(tags.ACTION_RE.search(turn).group(2)).group(1) == "print(1)\n"
  assert tags.PAPER_CODE_RE.search(turn) is None  # the released script wants ```python
  assert tags.QUOTED_NAME_RE.findall("""{'dark', "blur"}""") == ["dark", "blur"]
  assert tags.PAPER_QUOTED_RE.findall("""{'dark', "blur"}""") == ["dark"]
  assert tags.UNCLOSED_CODE_RE.search("<code>```python\nx = 1").group(1) == "```python\nx = 1"
  assert tags.INFORMATION_RE.findall("a <information> 1. x\n2. y </information> b") == [
      "<information> 1. x\n2. y </information>"
  ]


def test_callers_read_through_the_grammar():
  assert actions.parse_action("<think>t</think><problem>{'dark', \"blur\"}</problem>").problems == ("dark", "blur")
  assert [a.kind for a in paper_rules.read_turn("<problem>{'dark'}</problem><code>```python\nx```</code>", "coding")
         ] == ["problem", "code"]
  assert code.extract_program("<code>```python\nx = 1\n```") == "x = 1"
  assert records.strip_query("<query> q </query> ctx") == ("q", "ctx")
  assert records.parse_degradations("<problem> {'rotation90', 'dark'} </problem>") == ["rotation90", "dark"]
