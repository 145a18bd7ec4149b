"""Parsing one policy turn into its action: `<search>`, `<code>`, `<problem>`, `<answer>`, or malformed."""
from __future__ import annotations

import dataclasses

from varft import tags

ACTION_TAGS = tags.ACTION_TAGS


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
  think = tags.THINK_RE.search(text)
  think = think.group(1).strip() if think else ""
  match = tags.ACTION_RE.search(text)
  if match is None:
    opened = [t for t in ACTION_TAGS if tags.open_tag(t) in text]
    why = f"<{opened[0]}> is never closed" if opened else "no <search>, <code>, <problem> or <answer> tag"
    return Action("malformed", think=think, error=why)
  kind, body = match.group(1), match.group(2).strip()
  if kind == tags.CODE:
    fence = tags.FENCE_RE.search(body)
    body = fence.group(1).strip("\n") if fence else body
  if not body.strip():
    return Action("malformed", think=think, error=f"empty <{kind}>")
  problems = tuple(tags.QUOTED_NAME_RE.findall(body)) if kind == tags.PROBLEM else ()
  return Action(kind, body, think, problems)
