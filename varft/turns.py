"""The agent's turn rules as pure host functions: which strings end a turn, how a turn's text becomes actions, when
a trajectory stops, what an observation says, and the tokens (with M-RoPE positions) of the user turn showing it."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from varft import actions as actions_lib
from varft import paper_rules, prompts
from varft.models.qwen25vl import rope

# A turn ends at the first closing action tag (`RolloutConfig.stop_at='closing_tag'`).
AGENT_STOP_TAGS = ("</search>", "</code>", "</answer>", "</problem>")
# Why a trajectory ended.
STOP_REASONS = ("answer", "step", "malformed", "max_turns", "max_new_tokens", "max_tokens", "tool_error")
TRUNCATION_NOTE = " ... [tool output truncated: {} more tokens]"


def read_actions(text: str, plain: str, task: str, last_query: str | None,
                 agent_rules: str) -> tuple[list[actions_lib.Action], str | None]:
  """(the turn's actions, the latest search query): varft's parser on the sampled text (one action), or the
  released scripts' rules on the text without special tokens (`paper_rules`)."""
  if agent_rules != "paper":
    return [actions_lib.parse_action(text)], last_query
  actions = paper_rules.read_turn(plain, task, last_query)
  for action in actions:
    if action.kind == "search":
      last_query = action.content
  return actions, last_query


def turn_end(action: actions_lib.Action, out_of_budget: bool, full: bool, stepwise: bool,
             last_turn: bool) -> str | None:
  """Why the trajectory ends after a turn whose first action is `action` (None: its tools run and it goes on).
  `out_of_budget`: the turn stopped on its token budget; `full`: the trajectory reached max_total_tokens."""
  if action.kind == "malformed":
    if out_of_budget:
      return "max_tokens" if full else "max_new_tokens"
    return "malformed"
  if action.kind == "answer":
    return "answer"
  if stepwise:
    return "step"
  return "max_turns" if last_turn else None


def observation_text(action: actions_lib.Action, obs, image_error: str | None, paper: bool) -> tuple[str, bool, str]:
  """(the text an action's observation shows, ok, error). `obs` is the tool's Observation (None: the action ran no
  tool); `image_error` says why its output image could not be read."""
  if action.kind == "problem":
    return prompts.problem_tip(action.problems), True, ""
  if obs is None:  # a code action without a program (paper rules): a failed call that shows nothing
    return "", False, action.error
  ok, error = bool(obs.ok), obs.error or ""
  if action.kind == "search":
    body = obs.text or f"Error: {error}"
    return (body if body.lstrip().startswith("<information>") else prompts.search_observation(body)), ok, error
  if image_error is not None:
    ok, error = False, f"the output image cannot be read: {image_error}"
  text = "" if paper else (obs.text or "").strip() or ("" if ok else f"Error: {error}")
  return text, ok, error


def cut(body: list[int], limit: int, encode: Callable[[str], list[int]]) -> tuple[list[int], bool]:
  """An observation's tokens cut to `limit` with a note saying how many were dropped; (tokens, truncated)."""
  if len(body) <= limit:
    return body, False
  return body[:limit] + encode(TRUNCATION_NOTE.format(len(body) - limit)), True


def chain_step(turn_text: str, action: actions_lib.Action, observation: str, paper: bool) -> str:
  """What one acted-on action adds to the single-turn layout's prompt text."""
  if paper:
    return paper_rules.chain_step(turn_text, action, observation)
  return f"\n{turn_text}" + (f"\n{observation}" if observation else "")


def chat_turn(opening: Sequence[int], closing: Sequence[int], observed: Sequence[tuple[list[int], str | None]],
              image_tokens: Mapping[str, int], ids) -> list[tuple[list[int], str | None]]:
  """The user turn showing a turn's observations ((body tokens, image key or None) each) as (tokens, image key)
  pieces: `opening`, each image between vision start/end, each body, `closing`. `ids`: the tokenizer's ids."""
  pieces = [(list(opening), None)]
  for body, image_key in observed:
    if image_key is not None:
      pieces += [([ids.vision_start_id], None), ([ids.image_pad_id] * image_tokens[image_key], image_key),
                 ([ids.vision_end_id], None)]
    pieces.append((list(body), None))
  return pieces + [(list(closing), None)]


def place(pieces, start: int, grids: Mapping[str, np.ndarray], merge: int):
  """Flattens (tokens, image key) pieces into (tokens, M-RoPE positions (3, n), per-token image keys, per-token
  index within the image, the next text position): text advances all three axes, an image its (t, h, w) grid."""
  tokens, positions, keys, local = [], [], [], []
  for ids, key in pieces:
    if key is None:
      pos, start = rope.text_positions(start, len(ids))
      keys += [None] * len(ids)
      local += [-1] * len(ids)
    else:
      pos, start = rope.image_positions(start, grids[key], merge)
      keys += [key] * len(ids)
      local += list(range(len(ids)))
    tokens += ids
    positions.append(pos)
  return tokens, np.concatenate(positions, axis=1), keys, local, start
