"""Parsing one policy turn into its action: `<search>`, `<code>`, `<problem>`, `<answer>`, or malformed."""
from __future__ import annotations

import dataclasses
import re

ACTION_TAGS = ("search", "code", "problem", "answer")
_ACTION_RE = re.compile(r"<(search|code|problem|answer)>(.*?)</\1>", re.S)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n?(.*?)```", re.S | re.I)
_PROBLEM_RE = re.compile(r"""['"]([A-Za-z0-9_]+)['"]""")


@dataclasses.dataclass(frozen=True)
class Action:
  """What a turn asks for. `kind` is one of ACTION_TAGS or 'malformed' (then `error` says why).

  `content` is the tag's stripped text: the query, the program (fenced block if any), the answer, or the problem
  set's raw text; `problems` lists the problem names of a `<problem>` step.
  """
  kind: str
  content: str = ""
  think: str = ""
  problems: tuple[str, ...] = ()
  error: str = ""


def parse_action(text: str) -> Action:
  """The first complete action tag of a turn (generation stops at the first closing tag)."""
  think = _THINK_RE.search(text)
  think = think.group(1).strip() if think else ""
  match = _ACTION_RE.search(text)
  if match is None:
    opened = [t for t in ACTION_TAGS if f"<{t}>" in text]
    why = f"<{opened[0]}> is never closed" if opened else "no <search>, <code>, <problem> or <answer> tag"
    return Action("malformed", think=think, error=why)
  kind, body = match.group(1), match.group(2).strip()
  if kind == "code":
    fence = _FENCE_RE.search(body)
    body = fence.group(1).strip("\n") if fence else body
  if not body.strip():
    return Action("malformed", think=think, error=f"empty <{kind}>")
  problems = tuple(_PROBLEM_RE.findall(body)) if kind == "problem" else ()
  return Action(kind, body, think, problems)
