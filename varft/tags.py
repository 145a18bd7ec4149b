"""The one tag grammar of an agent turn: tag names, the patterns that read them, the degradation list.

A turn is `<think>…</think>` then one action tag (`<search>`, `<code>```python …```</code>`, `<problem>{…}</problem>`,
`<answer>`); the prompt wraps the question in `<query>` and search results come back in `<information>`. Every
module that reads tags takes them from here: actions (varft's parser), paper_rules and the rewards (the released
scripts' exact regexes), the data records, the code tool and the SFT data.

Two readings differ on purpose, and their names say which is which:
* varft's (`ACTION_RE`, `THINK_RE`, `FENCE_RE`, `QUOTED_NAME_RE`, `content(..., multiline=True)`): lenient,
  multi-line contents, any of ```` ```python ````/```` ```py ````/a bare fence;
* the released Visual-ARFT code's (`PAPER_*`, `content(..., multiline=False)`): `re.search` without DOTALL, so an
  answer or query that spans lines is no answer or query, fences must say ```` ```python ````, problem names
  are single-quoted. Changing one of these changes the paper's numbers (tests/rewards, tests/eval check them).
"""
from __future__ import annotations

import functools
import re

THINK, SEARCH, CODE, PROBLEM, ANSWER = "think", "search", "code", "problem", "answer"
QUERY, INFORMATION = "query", "information"
ACTION_TAGS = (SEARCH, CODE, PROBLEM, ANSWER)
TAGS = (THINK, *ACTION_TAGS, QUERY, INFORMATION)
FENCE_PY, FENCE = "```python", "```"
# MAT-Coding's degradation types (the paper's <problem> vocabulary); the rotations first: their ids are the
# reward ops' partial-credit ids (varft.rewards.ops.ROTATION90/ROTATION180).
DEGRADATIONS = ("rotation90", "rotation180", "dark", "overexposure", "blur", "noise", "crop", "none")
ROTATIONS = DEGRADATIONS[:2]


def open_tag(tag: str) -> str:
  return f"<{tag}>"


def close_tag(tag: str) -> str:
  return f"</{tag}>"


def problem_set_text(names=DEGRADATIONS) -> str:
  """`{'rotation90', 'rotation180', …}`: a problem set as the paper writes it (prompts and references)."""
  return "{" + ", ".join(f"'{name}'" for name in names) + "}"


_ACTIONS = "|".join(ACTION_TAGS)

# varft's lenient reading.
ACTION_RE = re.compile(rf"<({_ACTIONS})>(.*?)</\1>", re.S)  # the first complete action tag
THINK_RE = re.compile(rf"<{THINK}>(.*?)</{THINK}>", re.S)
FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n?(.*?)```", re.S | re.I)
QUOTED_NAME_RE = re.compile(r"""['"]([A-Za-z0-9_]+)['"]""")  # 'dark' or "dark" inside a <problem> set
WORD_RE = re.compile(r"[A-Za-z0-9]+")  # an unquoted problem set's names
UNCLOSED_CODE_RE = re.compile(rf"<{CODE}>(.*?)(?:</{CODE}>|$)", re.S)  # a <code> cut off by the token budget
INFORMATION_RE = re.compile(rf"<{INFORMATION}>.*?</{INFORMATION}>", re.S)  # a whole search observation

# The released scripts' exact regexes (Liuziyu77/Visual-RFT, Visual-ARFT/): eval loops and trainers.
PAPER_ANSWER_RE = re.compile(rf"<{ANSWER}>\s*(.*?)\s*</{ANSWER}>")
PAPER_SEARCH_RE = re.compile(rf"<{SEARCH}>\s*(.*?)\s*</{SEARCH}>")
PAPER_PROBLEM_RE = re.compile(rf"<{PROBLEM}>\s*\{{(.*?)\}}\s*</{PROBLEM}>", re.S)
PAPER_QUOTED_RE = re.compile(r"'([^']+)'")
PAPER_CODE_RE = re.compile(rf"<{CODE}>\s*```python(.*?)```.*?</{CODE}>", re.S)
# The trainers' format rewards (re.fullmatch with DOTALL) per reference step type.
_PAPER_THINK = rf"<{THINK}>.*?</{THINK}>\s*"
PAPER_FORMAT_PATTERNS = {
    ANSWER: rf"{_PAPER_THINK}<{ANSWER}>.*?</{ANSWER}>",
    SEARCH: rf"{_PAPER_THINK}<{SEARCH}>.*?</{SEARCH}>",
    CODE: rf"{_PAPER_THINK}<{CODE}>\s*```python(.*?)```.*?</{CODE}>",
    PROBLEM: rf"^{_PAPER_THINK}<{PROBLEM}>\s*\{{\s*'[^']+'\s*(?:,\s*'[^']+'\s*)*\}}\s*</{PROBLEM}>$",
}


@functools.cache
def tag_re(tag: str, multiline: bool = True) -> re.Pattern:
  """`<tag>(.*?)</tag>`; `multiline=False` is the released trainers' one-line `re.search` (no DOTALL)."""
  if tag not in TAGS:
    raise ValueError(f"unknown tag {tag!r}; the grammar's tags are {TAGS}")
  return re.compile(f"<{tag}>(.*?)</{tag}>", re.S if multiline else 0)


def content(text: str, tag: str, multiline: bool = True) -> str | None:
  """The unstripped content of the first complete `<tag>…</tag>` in `text`, or None when there is none."""
  match = tag_re(tag, multiline).search(text)
  return match.group(1) if match else None
