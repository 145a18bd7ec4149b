"""The paper's answer metrics, by hand."""
import pytest

from varft import text_norm
from varft.eval import metrics


def test_normalisation():
  assert text_norm.normalize_answer("  The  Eiffel-Tower, an icon! ") == "eiffeltower icon"
  assert text_norm.normalize_answer("《巴黎》 是 a 城市。", cjk=True) == "巴黎是a城市"
  assert text_norm.normalize_answer("An apple（红）", cjk=False) == "apple（红）"


def test_set_f1_is_not_multiset_f1():
  assert metrics.f1_score("cat cat", "cat cat dog") == pytest.approx(0.4)
  assert metrics.squad_f1_score("cat cat", "cat cat dog") == pytest.approx(0.8)
  assert metrics.f1_score(None, "x") == metrics.exact_match(None, "x") == 0.0


def test_item_takes_max_over_golds_and_forces_f1_on_exact_match():
  assert metrics.score_item("Berlin", ["Paris", "berlin."]) == (1.0, 1.0)
  assert metrics.f1_score("The", "a") == 0.0  # both normalise to the empty string
  assert metrics.score_item("The", ["a"]) == (1.0, 1.0)
  assert metrics.score_item("x", []) == (0.0, 0.0)


def test_cjk_is_compared_per_character_only_in_the_coding_variant():
  assert metrics.f1_score("巴黎", "巴黎法国", cjk=True) == pytest.approx(2 / 3)
  assert metrics.f1_score("巴黎", "巴黎法国") == 0.0
  assert metrics.exact_match("巴 黎，", "巴黎", cjk=True) == 1.0
  assert metrics.f1_score("Paris 巴黎", "Paris", cjk=True) == pytest.approx(5 / 6)
