"""A scripted policy for the rollout engines: tokens forced through the real sampler (tests and benchmarks)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

from varft import prompts, rollout
from varft.eval import direct
from varft.tools.executor import Observation


class InstantSearch:
  """A search tool that answers every query at once with one document naming it."""

  def execute(self, calls):
    return [
        Observation(prompts.search_observation([f"{c.payload} is known."]), None, True, None, 0.0, "search", c.call_id)
        for c in calls
    ]


class ScriptedEngine(rollout.RolloutEngine):
  """`script(trajectory index, turn)` -> the tokens that turn is forced to (entries < 0 and the rest sampled) or
  None; a turn resumed mid-way is forced from where it stands."""

  def __init__(self, *args, script: Callable[[int, int], Sequence[int] | None], **kwargs):
    super().__init__(*args, **kwargs)
    self.script = script

  def scripted_tokens(self, row):
    tokens = self.script(row.index, row.turns)
    return None if tokens is None else list(tokens)[len(row.turn_tokens):]


class ScriptedDirectEngine(direct.DirectAnswerEngine):
  """`script(example index)` -> the reply's first tokens, or None."""

  def __init__(self, *args, script: Callable[[int], Sequence[int] | None], **kwargs):
    super().__init__(*args, **kwargs)
    self.script = script

  def scripted_tokens(self, index: int):
    return self.script(index)
