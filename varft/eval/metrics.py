"""Answer metrics with the Visual-ARFT scoring rules (plain Python, per item).

F1 is over the *set* of normalised tokens (the paper's choice; precision and recall divide by the
token-list lengths), EM compares normalised strings, a missing prediction (`None`) scores 0,
an item takes the max over its gold answers, and its F1 is forced to 1 when its EM is 1.
`cjk=True` is MAT-Coding's variant: CJK punctuation is stripped and, when either side holds CJK
characters, both sides are compared per character.
"""
import collections
from collections.abc import Sequence

from varft import text_norm


def _tokens(pred_norm: str, gold_norm: str, cjk: bool) -> tuple[list[str], list[str]]:
  if cjk and (text_norm.has_cjk(pred_norm) or text_norm.has_cjk(gold_norm)):
    return list(pred_norm), list(gold_norm)
  return pred_norm.split(), gold_norm.split()


def _f1_from_counts(num_same: int, num_pred: int, num_gold: int) -> float:
  if num_same == 0:
    return 0.0
  precision, recall = num_same / num_pred, num_same / num_gold
  return 2 * precision * recall / (precision + recall)


def f1_score(pred: str | None, gold: str, *, cjk: bool = False) -> float:
  """The paper's set-based token F1 (0 for a missing prediction)."""
  if pred is None:
    return 0.0
  pred_tokens, gold_tokens = _tokens(text_norm.normalize_answer(pred, cjk=cjk),
                                     text_norm.normalize_answer(gold, cjk=cjk), cjk)
  return _f1_from_counts(len(set(pred_tokens) & set(gold_tokens)), len(pred_tokens), len(gold_tokens))


def squad_f1_score(pred: str | None, gold: str, *, cjk: bool = False) -> float:
  """SQuAD's multiset token F1 (an option; the paper uses the set version)."""
  if pred is None:
    return 0.0
  pred_tokens, gold_tokens = _tokens(text_norm.normalize_answer(pred, cjk=cjk),
                                     text_norm.normalize_answer(gold, cjk=cjk), cjk)
  common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
  return _f1_from_counts(sum(common.values()), len(pred_tokens), len(gold_tokens))


def exact_match(pred: str | None, gold: str, *, cjk: bool = False) -> float:
  """1.0 when the normalised strings are equal (0 for a missing prediction)."""
  if pred is None:
    return 0.0
  return float(text_norm.normalize_answer(pred, cjk=cjk) == text_norm.normalize_answer(gold, cjk=cjk))


def score_item(pred: str | None, golds: Sequence[str], *, cjk: bool = False) -> tuple[float, float]:
  """(F1, EM) of one prediction: max over gold answers, F1 forced to 1 when EM is 1."""
  if not golds:
    return 0.0, 0.0
  em = max(exact_match(pred, gold, cjk=cjk) for gold in golds)
  f1 = 1.0 if em == 1.0 else max(f1_score(pred, gold, cjk=cjk) for gold in golds)
  return f1, em
