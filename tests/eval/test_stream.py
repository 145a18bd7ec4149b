"""Scoring an evaluation run's items: a whole MAT benchmark by its splits, a subset as one split."""
from varft.eval import stream


def test_score_items_full_benchmark_and_subset():
  items = [{"pred_answer": "Paris", "gt": ["paris"]}, {"pred_answer": None, "gt": "Rome"}]
  subset = stream.score_items(items, "mat_search")  # 2 of 150 items: one split, no simple/hard
  assert subset["all"] == {"f1": 50.0, "em": 50.0, "count": 2} and subset["num_missing"] == 1
  assert "simple" not in subset
  full = stream.score_items(items * 75, "mat_search")
  assert full["simple"]["count"] == 75 and full["all"]["em"] == 50.0
  assert stream.score_items(items, "multihop_demo")["all"]["f1"] == 50.0
