"""Plain-Python, per-sample versions of the paper's training rewards.

They state the rules with the paper's own regular expressions and are the reference that the
jitted batch ops are tested against (and the peer in benchmarks/rewards_throughput.py).
`task` is 'search' (Visual-ARFT search agent) or 'coding' (coding agent); their format and
wrong-action rules differ slightly, as in the paper. The search agent's first check, `math_verify`
equality of the whole completion and solution, is an option of the host adapter
(`RewardOptions.math_verify`), not stated here. Answers are read as the paper reads them: the
first single-line `<answer>…</answer>` (no DOTALL), problem lists sorted.
"""
from collections.abc import Callable, Sequence
import re

from varft import tags as grammar
from varft.eval import metrics

ANSWER_PATTERN = grammar.PAPER_FORMAT_PATTERNS["answer"]
SEARCH_PATTERN = grammar.PAPER_FORMAT_PATTERNS["search"]
CODE_PATTERN = grammar.PAPER_FORMAT_PATTERNS["code"]
PROBLEM_PATTERN = grammar.PAPER_FORMAT_PATTERNS["problem"]
# Tags whose repetition voids the format, per task.
_COUNTED_TAGS = {
    "search": ("<answer>", "<search>", "<think>"),
    "coding": ("<answer>", "<code>", "<think>", "<problem>")
}
# Action tags that zero a step's accuracy when present in the completion.
FORBIDDEN_TAGS = {
    ("search", "answer"): ("<search>",),
    ("coding", "answer"): ("<code>", "<problem>"),
    ("search", "search"): ("<answer>",),
    ("coding", "search"): ("<answer>",),
    ("search", "code"): ("<answer>", "<problem>"),
    ("coding", "code"): ("<answer>", "<problem>"),
    ("search", "problem"): ("<answer>", "<code>"),
    ("coding", "problem"): ("<answer>", "<code>"),
}
STEP_TYPE_PRIORITY = {"search": ("answer", "search"), "coding": ("answer", "code", "problem")}
ROTATIONS = grammar.ROTATIONS


def _fullmatch(pattern: str, text: str) -> bool:
  return re.fullmatch(pattern, text, re.DOTALL) is not None


def format_reward(text: str, task: str, step_type: str | None) -> float:
  """The paper's format reward: 1.0 when `text` has the required tag layout."""
  if any(text.count(tag) >= 2 for tag in _COUNTED_TAGS[task]):
    return 0.0
  if task == "search":  # either action is fine; an <answer>…</answer> pair decides which is checked
    is_answer, is_search = _fullmatch(ANSWER_PATTERN, text), _fullmatch(SEARCH_PATTERN, text)
    if "<answer>" in text and "</answer>" in text:
      return float(is_answer and not is_search)
    if "<search>" in text and "</search>" in text:
      return float(is_search and not is_answer)
    return 0.0
  if step_type not in ("answer", "code", "problem"):
    return 0.0
  return float(_fullmatch(grammar.PAPER_FORMAT_PATTERNS[step_type], text))


def step_type_of(solution: str, task: str) -> str | None:
  """The action of a reference step, found from its tags as the paper does (first match wins)."""
  for step_type in STEP_TYPE_PRIORITY[task]:
    if f"<{step_type}>" in solution:
      return step_type
  return None


def extract_tag(text: str, tag: str) -> str:
  """Content of the first single-line <tag>…</tag>, else the whole text (both stripped)."""
  found = grammar.content(text, tag, multiline=False)
  return (text if found is None else found).strip()


def eval_answer(text: str) -> str | None:
  """The released evaluation loops' prediction from a turn: the first single-line <answer>…</answer>, stripped;
  None when there is none (their `re.search` without DOTALL)."""
  match = grammar.PAPER_ANSWER_RE.search(text)  # no DOTALL: a multi-line answer is no answer
  return match.group(1).strip() if match else None


def extract_problems(text: str) -> list[str]:
  """Sorted quoted names of the first <problem>{…}</problem>; [] when there is none."""
  match = grammar.PAPER_PROBLEM_RE.search(text)
  return sorted(grammar.PAPER_QUOTED_RE.findall(match.group(1))) if match else []


def problem_reward(pred: Sequence[str], gold: Sequence[str]) -> float:
  """1.0 for the same degradation list, 0.5 for naming only the rotation of a two-problem image."""
  pred, gold = sorted(pred), sorted(gold)
  for rotation in ROTATIONS:
    if len(gold) == 2 and rotation in gold:
      if pred == [rotation]:
        return 0.5
      break  # the paper's if/elif: only the first rotation found in the gold list is checked
  return float(pred == gold)


def accuracy_reward(text: str, task: str, step_type: str | None, *, answers: Sequence[str] = (), query: str = "",
                    problems: Sequence[str] = (), code_step_reward: float = 0.9,
                    similarity: Callable[[str, str], float] | None = None, similarity_threshold: float = 0.5) -> float:
  """The paper's accuracy reward for one step (answer F1, query similarity, code, problem set)."""
  if step_type is None or any(tag in text for tag in FORBIDDEN_TAGS[(task, step_type)]):
    return 0.0
  if step_type == "answer":
    pred = extract_tag(text, "answer")
    return max((metrics.f1_score(pred, gold) for gold in answers), default=0.0)
  if step_type == "search":
    score = similarity(extract_tag(text, "search"), query)
    return score if score >= similarity_threshold else 0.0
  if step_type == "code":
    return code_step_reward
  return problem_reward(extract_problems(text), problems)
