"""Tag events and the format automata (host side builds them; the device runs them).

The policy's tokenizer does not keep tags whole (Qwen2.5 splits `<answer>` into `<`, `answer`,
`>` and merges `>` with the following text, e.g. `>x`), so token ids cannot drive a tag state
machine. The host instead cuts the decoded text into a short sequence of small integer *events*:
one per tag, code fence and problem-set punctuation, and one per stretch of other text between
them (WS when that stretch is only whitespace, TEXT otherwise). Over this alphabet the paper's
format regular expressions are regular languages; `format_tables()` compiles them into DFA
transition tables that `ops.format_reward` runs with `lax.scan`.
"""
import functools
import re

import numpy as np

from varft import tags as grammar

PAD, WS, TEXT, LBRACE, RBRACE, QUOTE, COMMA, FENCE_PY, FENCE = range(9)
TAGS = (grammar.THINK, grammar.ANSWER, grammar.SEARCH, grammar.CODE, grammar.PROBLEM)
# Opening tag of TAGS[i] is event 9 + 2 i, its closing tag 10 + 2 i.
OPEN = {tag: 9 + 2 * i for i, tag in enumerate(TAGS)}
CLOSE = {tag: 10 + 2 * i for i, tag in enumerate(TAGS)}
NUM_EVENTS = 9 + 2 * len(TAGS)

_SPECIAL_EVENTS = {grammar.FENCE_PY: FENCE_PY, grammar.FENCE: FENCE, "{": LBRACE, "}": RBRACE, "'": QUOTE, ",": COMMA}
for _tag in TAGS:
  _SPECIAL_EVENTS[grammar.open_tag(_tag)] = OPEN[_tag]
  _SPECIAL_EVENTS[grammar.close_tag(_tag)] = CLOSE[_tag]
# Longer alternatives first so that "```python" wins over "```".
_SPLIT_RE = re.compile("(" + "|".join(re.escape(s) for s in sorted(_SPECIAL_EVENTS, key=len, reverse=True)) + ")")


def text_to_events(text: str) -> list[int]:
  """The event sequence of `text` (no PAD)."""
  events = []
  for i, piece in enumerate(_SPLIT_RE.split(text)):
    if i % 2:
      events.append(_SPECIAL_EVENTS[piece])
    elif piece:
      # str.strip() and the paper's regex `\s` agree on what is whitespace (Unicode isspace).
      events.append(WS if not piece.strip() else TEXT)
  return events


# A tiny regular-expression algebra over event sets: Thompson NFA, then subset construction.
_ANY = frozenset(range(1, NUM_EVENTS))


def _sym(*events):
  return ("sym", frozenset(events))


def _seq(*parts):
  return ("seq", parts)


def _star(part):
  return ("star", part)


def _opt(part):
  return ("opt", part)


def _build_nfa(node, edges, counter):
  """Adds `node` to the NFA; returns its (start, end) states. Epsilon edges carry None."""

  def new():
    counter[0] += 1
    return counter[0] - 1

  kind, arg = node
  start, end = new(), new()
  if kind == "sym":
    edges.append((start, arg, end))
  elif kind == "seq":
    prev = start
    for part in arg:
      s, e = _build_nfa(part, edges, counter)
      edges.append((prev, None, s))
      prev = e
    edges.append((prev, None, end))
  elif kind in ("star", "opt"):
    s, e = _build_nfa(arg, edges, counter)
    edges += [(start, None, s), (e, None, end), (start, None, end)]
    if kind == "star":
      edges.append((e, None, s))
  else:
    raise ValueError(f"unknown pattern node {kind!r}")
  return start, end


def compile_dfa(pattern) -> tuple[np.ndarray, np.ndarray]:
  """(transitions (S, NUM_EVENTS) int32, accepting (S,) bool) for a full match; state 0 starts.

  PAD leaves the state unchanged, so padded event rows give the result of the real events.
  """
  edges, counter = [], [0]
  nfa_start, nfa_end = _build_nfa(pattern, edges, counter)
  eps, moves = {}, {}
  for src, symbols, dst in edges:
    if symbols is None:
      eps.setdefault(src, []).append(dst)
    else:
      moves.setdefault(src, []).append((symbols, dst))

  def closure(states):
    stack, seen = list(states), set(states)
    while stack:
      for nxt in eps.get(stack.pop(), ()):
        if nxt not in seen:
          seen.add(nxt)
          stack.append(nxt)
    return frozenset(seen)

  ids = {closure({nfa_start}): 0}
  order = list(ids)
  rows = []
  while len(rows) < len(order):
    current = order[len(rows)]
    row = []
    for event in range(NUM_EVENTS):
      if event == PAD:
        row.append(len(rows))
        continue
      target = closure({dst for src in current for symbols, dst in moves.get(src, ()) if event in symbols})
      if target not in ids:
        ids[target] = len(order)
        order.append(target)
      row.append(ids[target])
    rows.append(row)
  accepting = np.array([nfa_end in states for states in order], dtype=bool)
  return np.asarray(rows, dtype=np.int32), accepting


def _think_then(tag, *body):
  """`<think>.*?</think>\\s*<tag> body </tag>` as events."""
  return _seq(_sym(OPEN["think"]), _star(_sym(*_ANY)), _sym(CLOSE["think"]), _opt(_sym(WS)), _sym(OPEN[tag]), *body,
              _sym(CLOSE[tag]))


_NOT_QUOTE = _sym(*(_ANY - {QUOTE}))
_QUOTED = _seq(_sym(QUOTE), _NOT_QUOTE, _star(_NOT_QUOTE), _sym(QUOTE), _opt(_sym(WS)))
# The paper's patterns (varft.tags.PAPER_FORMAT_PATTERNS: re.fullmatch, DOTALL) over events, in this order:
FORMAT_PATTERNS = ("answer", "search", "code", "problem")
_PATTERNS = {
    "answer": _think_then("answer", _star(_sym(*_ANY))),
    "search": _think_then("search", _star(_sym(*_ANY))),
    "code": _think_then("code", _opt(_sym(WS)), _sym(FENCE_PY), _star(_sym(*_ANY)), _sym(FENCE, FENCE_PY),
                        _star(_sym(*_ANY))),
    "problem": _think_then("problem", _opt(_sym(WS)), _sym(LBRACE), _opt(_sym(WS)), _QUOTED,
                           _star(_seq(_sym(COMMA), _opt(_sym(WS)), _QUOTED)), _sym(RBRACE), _opt(_sym(WS))),
}


@functools.cache
def format_tables() -> tuple[np.ndarray, np.ndarray]:
  """Stacked DFAs for FORMAT_PATTERNS: (transitions (4, S, NUM_EVENTS), accepting (4, S)).

  Smaller automata are padded with dead, non-accepting states that loop on themselves.
  """
  dfas = [compile_dfa(_PATTERNS[name]) for name in FORMAT_PATTERNS]
  size = max(t.shape[0] for t, _ in dfas)
  transitions = np.zeros((len(dfas), size, NUM_EVENTS), np.int32)
  accepting = np.zeros((len(dfas), size), bool)
  for k, (t, a) in enumerate(dfas):
    transitions[k] = np.arange(size)[:, None]
    transitions[k, :t.shape[0]] = t
    accepting[k, :a.shape[0]] = a
  return transitions, accepting


def run_dfa(transitions: np.ndarray, accepting: np.ndarray, events: list[int]) -> bool:
  """Host-side DFA run (for tests and debugging)."""
  state = 0
  for event in events:
    state = transitions[state, event]
  return bool(accepting[state])
