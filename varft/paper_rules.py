"""How the released Visual-ARFT eval scripts read a model turn and grow the next prompt (`agent_rules='paper'`).

Facts from `evaluation_search/**/evaluation_*_visual_arft.py` and
`evaluation_coding/evaluation_mat_coding_visual_arft.py` (Liuziyu77/Visual-RFT): the turn is the decoded generation
without special tokens, read by substring tests and regexes (answers and queries on one line: no DOTALL):

* search: `<answer>` anywhere ends the item (prediction from the first one-line `<answer> ... </answer>`, else none);
  else `<search>` runs the first one-line query (one without a parsable query reuses the previous query; on the
  first turn the script fails and the item has no prediction); else the turn is ignored.
* coding: `<answer>` ends the item the same way; else a `<problem>` set (its quoted names, sorted) adds the tip, and
  a `<code>` with a ```python block runs (both in one turn if both are there).

A turn the scripts ignore makes them ask again with the same prompt; under their greedy decoding the answer is the
same each time, so here it ends the item at once (`malformed`): the same prediction (none), fewer model calls.
"""
from __future__ import annotations

from collections.abc import Sequence

from varft import prompts, tags
from varft.actions import Action


def read_turn(text: str, task: str, last_query: str | None = None) -> list[Action]:
  """The actions the released script takes on one turn, in its order; a lone `malformed` ends the item.

  A code action whose program cannot be extracted carries `error` and an empty program: a failed call.
  """
  if "<answer>" in text:
    match = tags.PAPER_ANSWER_RE.search(text)
    if match is None:
      return [Action("malformed", error="<answer> without a one-line <answer> ... </answer>")]
    return [Action("answer", match.group(1).strip())]
  if task != "coding":
    if "<search>" not in text:
      return [Action("malformed", error="no <answer> or <search>")]
    match = tags.PAPER_SEARCH_RE.search(text)
    query = match.group(1).strip() if match else last_query
    if query is None:
      return [Action("malformed", error="<search> without a one-line query, and no earlier query")]
    return [Action("search", query)]
  actions = []
  if "<problem>" in text:
    match = tags.PAPER_PROBLEM_RE.search(text)
    problems = tuple(sorted(tags.PAPER_QUOTED_RE.findall(match.group(1)))) if match else ()
    if not problems:  # the released script stops with an IndexError here
      return [Action("malformed", error="<problem> without a quoted problem set")]
    actions.append(Action("problem", match.group(1), problems=problems))
  if "<code>" in text:
    match = tags.PAPER_CODE_RE.search(text)
    actions.append(
        Action("code", match.group(1)
              ) if match else Action("code", "", error="no ```python ... ``` block inside <code> ... </code>"))
  return actions or [Action("malformed", error="no <answer>, <problem> or <code>")]


def chain_step(turn: str, action: Action, observation: str) -> str:
  """What one acted-on action of `turn` appends to the prompt text: search `\\n{turn}\\n{information}`, problem
  `\\n{turn}\\n{tip}` (+ `\\n` unless the problem is 'none'), code `\\n{turn}` (the output image, if any, replaces
  the prompt image; nothing else is shown)."""
  if action.kind == "search":
    return f"\n{turn}\n{observation}"
  if action.kind == "problem":
    return f"\n{turn}\n{prompts.problem_tip(action.problems)}" + ("" if action.problems[0] == "none" else "\n")
  return f"\n{turn}"


def problem_set(actions: Sequence[Action]) -> tuple[str, ...] | None:
  """The problem set named by this turn, if any (the crop override follows the latest one)."""
  sets = [a.problems for a in actions if a.kind == "problem"]
  return sets[-1] if sets else None
