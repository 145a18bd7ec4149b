"""The agent's turn rules as pure host functions: which strings end a turn, how a turn's text becomes actions, when
a trajectory stops, and the tokens of the user turn that shows a turn's observations."""
from __future__ import annotations

# A turn ends at the first closing action tag (`RolloutConfig.stop_at='closing_tag'`).
AGENT_STOP_TAGS = ("</search>", "</code>", "</answer>", "</problem>")
