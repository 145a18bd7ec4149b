"""Gold injection, as the released Visual-ARFT coding trainer does it (`grpo_trainer_aid.py`).

In every group of G samples of one prompt, one sample drawn uniformly is *scored* as if it had written the
reference step (the record's `gt`: the step with its <think>): it gets the reward the reference gets, so every
group holds one high reward to compare against. Its tokens, log-probs and gradient stay the sample's own; only the
text the rewards read is replaced. Host-side (numpy), before `score_batch`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def inject_gold(completions: Sequence[str], golds: Sequence[str], group_ids: Sequence[int],
                rng: np.random.Generator) -> tuple[list[str], np.ndarray, int]:
  """(texts to score, injected (N,) bool, groups without a gold).

  `golds[i]` is the reference step of row i's prompt (rows of one group share it); a group whose gold is empty keeps
  its samples' texts and is counted. Groups are drawn in the order they first appear, one `rng.integers` each.
  """
  if not len(completions) == len(golds) == len(group_ids):
    raise ValueError(f"inject_gold: {len(completions)} completions, {len(golds)} golds, {len(group_ids)} group ids")
  texts = list(completions)
  injected = np.zeros((len(texts),), bool)
  rows_of: dict[int, list[int]] = {}
  for row, group in enumerate(group_ids):
    rows_of.setdefault(int(group), []).append(row)
  missing = 0
  for rows in rows_of.values():
    gold = golds[rows[0]] or ""
    if not gold.strip():
      missing += 1
      continue
    row = rows[int(rng.integers(len(rows)))]
    texts[row] = gold
    injected[row] = True
  return texts, injected, missing
