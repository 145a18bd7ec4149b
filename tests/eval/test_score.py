"""Benchmark scoring: fixtures with hand-computed scores, file errors, the paper's released numbers."""
import json
import pathlib

import pytest

from varft.eval import score

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "predictions"
PAPER = pathlib.Path(__file__).parents[2].parent / "shared" / "data" / "visual-arft-predictions"


def test_multihop_fixture_by_hand():
  result = score.score_predictions(score.load_predictions(FIXTURES / "multihop_rules.json"), "hotpotqa")
  # per item F1: 1, 0, 0.4, 1, 1, 0.8; EM: 1, 0, 0, 1, 1, 0
  assert result["all"] == {"f1": pytest.approx(100 * 4.2 / 6), "em": pytest.approx(50.0), "count": 6}
  assert result["num_missing"] == 1 and "simple" not in result


def test_coding_fixture_uses_cjk_rules():
  items = score.load_predictions(FIXTURES / "coding_cjk_rules.json")
  # per item F1: 1, 2/3, 1, 1, 5/6; EM: 1, 0, 1, 1, 0
  cjk = score.score_predictions(items * 40, "mat_coding")
  assert cjk["all"]["f1"] == pytest.approx(100 * (4 + 2 / 3 + 5 / 6 - 1) / 5)
  assert cjk["all"]["em"] == pytest.approx(60.0)
  plain = score.score_predictions(items, "musique")  # no CJK rules: only "A" == "a" (both articles)
  assert plain["all"]["em"] == pytest.approx(20.0)


def test_mat_splits_by_position(tmp_path):
  items = [{"pred_answer": "yes", "gt": "yes"}] * 75 + [{"pred_answer": "no", "gt": ["yes"]}] * 75
  result = score.score_predictions(items, "mat_search")
  assert (result["simple"]["f1"], result["hard"]["f1"], result["all"]["em"]) == (100.0, 0.0, 50.0)
  assert (result["simple"]["count"], result["hard"]["count"]) == (75, 75)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON file"),
    ('{"pred_answer": "x", "gt": "x"}', "expected a JSON list"),
    ('[{"id": 7, "gt": "x"}]', r"item 0 \(id 7\): missing key 'pred_answer'"),
    ('[{"pred_answer": 3, "gt": "x"}]', "'pred_answer' must be a string or null"),
    ('[{"pred_answer": "x", "gt": []}]', "'gt' must be a string or a non-empty list"),
    ('[{"pred_answer": "x", "gt": "x"}]', "MAT-Search needs exactly 150 items"),
])
def test_malformed_files_fail_clearly(tmp_path, capsys, content, message):
  path = tmp_path / "preds.json"
  path.write_text(content)
  assert score.main(["--benchmark", "mat_search", str(path)]) == 2
  assert message.replace("\\", "") in capsys.readouterr().err


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
  out = tmp_path / "scores.json"
  assert score.main(["--benchmark", "bamboogle", str(FIXTURES / "multihop_rules.json"), "--out", str(out)]) == 0
  table = capsys.readouterr().out
  assert "Bamboogle" in table and "70.00" in table and "50.00" in table
  written = json.loads(out.read_text())
  assert written["all"]["count"] == 6 and written["benchmark"] == "bamboogle"
  with pytest.raises(score.PredictionFileError, match="no such prediction file"):
    score.load_predictions(tmp_path / "absent.json")


# The paper's released predictions scored with its rules give its tables.
PAPER_NUMBERS = [
    ("mat_search", "7b_step200_mat_search_web_n4.json", {
        "simple": (71.78, 66.67),
        "hard": (55.77, 44.00),
        "all": (63.77, 55.33)
    }),
    ("mat_search", "3b_step200_mat_search_web_n4.json", {
        "all": (53.70, 46.00)
    }),
    ("mat_coding", "7b_mat_coding_grpo_step1400.json", {
        "simple": (60.10, 51.43),
        "hard": (45.60, 25.38),
        "all": (50.67, 34.50)
    }),
    ("mat_coding", "3b_mat_coding_grpo_step1400.json", {
        "all": (35.90, 22.50)
    }),
    ("2wiki", "7b_step200_2wiki_web_n4.json", {
        "all": (63.09, 51.99)
    }),
    ("hotpotqa", "7b_step200_hotpotqa_web_n4.json", {
        "all": (48.01, 36.48)
    }),
    ("musique", "7b_step200_musique_web_n4.json", {
        "all": (22.71, 14.07)
    }),
    ("bamboogle", "7b_step200_bamboogle_web_n4.json", {
        "all": (60.15, 48.80)
    }),
]


@pytest.mark.skipif(not PAPER.is_dir(), reason="needs ../shared/data/visual-arft-predictions")
@pytest.mark.parametrize("bench, filename, expected", PAPER_NUMBERS)
def test_reproduces_paper_numbers(bench, filename, expected):
  result = score.score_predictions(score.load_predictions(PAPER / bench / filename), bench)
  for split, (f1, em) in expected.items():
    assert (round(result[split]["f1"], 2), round(result[split]["em"], 2)) == (f1, em), split
