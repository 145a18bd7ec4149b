"""Benchmark scoring with the Visual-ARFT rules: prediction file -> table and JSON.

  python -m varft.eval.score --benchmark mat_search preds.json [--out scores.json]

A prediction file is a JSON list of items with `pred_answer` (string, or null for no answer) and
`gt` (string or list of strings); other keys (`id`, `question`/`query`, `trajectory`) are kept
out of the scoring. MAT benchmarks are split by position: MAT-Search has 150 items (first 75
simple, last 75 hard), MAT-Coding 200 (first 70 simple, last 130 hard). Metrics: see
varft.eval.metrics; MAT-Coding uses the CJK-aware variant.
"""
import argparse
from collections.abc import Sequence
import dataclasses
import json
import sys
from typing import Any

from varft.eval import metrics


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """An evaluation benchmark: how it is scored, and where its items come from (a TFDS dataset in the manual dir
  named by the config key `data.<data_dir>`; `split` None for the only one)."""
  name: str
  dataset: str
  data_dir: str
  split: str | None = None
  cjk: bool = False
  num_items: int | None = None  # required item count (MAT splits are positional)
  num_simple: int | None = None  # the first num_simple items are the simple split


# The one registry of evaluation benchmarks (`config.eval.benchmarks` names these).
BENCHMARKS = {
    "mat_search": Benchmark("MAT-Search", "mat_benchmark/search", "mat_dir", num_items=150, num_simple=75),
    "mat_coding": Benchmark("MAT-Coding", "mat_benchmark/coding", "mat_dir", cjk=True, num_items=200, num_simple=70),
    "2wiki": Benchmark("2WikiMultihopQA", "multihop_qa/2wikimultihopqa", "flashrag_dir", "dev"),
    "hotpotqa": Benchmark("HotpotQA", "multihop_qa/hotpotqa", "flashrag_dir", "dev"),
    "musique": Benchmark("MuSiQue", "multihop_qa/musique", "flashrag_dir", "dev"),
    "bamboogle": Benchmark("Bamboogle", "multihop_qa/bamboogle", "flashrag_dir", "test"),
    "multihop_demo": Benchmark("Multi-hop demo", "multihop_qa/demo", "flashrag_dir", "test"),
}


class PredictionFileError(ValueError):
  """A prediction file that cannot be scored (the message says what is wrong and where)."""


def validate_predictions(items: Any, source: str = "predictions") -> list[dict]:
  """Checks the schema; returns the items. Raises PredictionFileError naming the bad item."""
  if not isinstance(items, list):
    raise PredictionFileError(f"{source}: expected a JSON list of prediction items, got {type(items).__name__}")
  for i, item in enumerate(items):
    where = f"{source}: item {i}" + (f" (id {item['id']!r})" if isinstance(item, dict) and "id" in item else "")
    if not isinstance(item, dict):
      raise PredictionFileError(f"{where}: expected an object with 'pred_answer' and 'gt', got {item!r:.80}")
    for key in ("pred_answer", "gt"):
      if key not in item:
        raise PredictionFileError(f"{where}: missing key {key!r} (has {sorted(item)})")
    if not (item["pred_answer"] is None or isinstance(item["pred_answer"], str)):
      raise PredictionFileError(f"{where}: 'pred_answer' must be a string or null, got {item['pred_answer']!r:.80}")
    gt = item["gt"]
    if not (isinstance(gt, str) or (isinstance(gt, list) and gt and all(isinstance(g, str) for g in gt))):
      raise PredictionFileError(f"{where}: 'gt' must be a string or a non-empty list of strings, got {gt!r:.80}")
  return items


def load_predictions(path: str) -> list[dict]:
  """Reads and validates a prediction file."""
  try:
    with open(path, encoding="utf-8") as f:
      items = json.load(f)
  except FileNotFoundError:
    raise PredictionFileError(f"{path}: no such prediction file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PredictionFileError(f"{path}: not a JSON file ({e})") from None
  return validate_predictions(items, path)


def _mean_percent(values: Sequence[float]) -> float:
  return 100.0 * sum(values) / len(values) if values else 0.0


def _split(f1s, ems) -> dict:
  return {"f1": _mean_percent(f1s), "em": _mean_percent(ems), "count": len(f1s)}


def score_predictions(items: Sequence[dict], benchmark: str, source: str = "predictions") -> dict:
  """F1/EM in percent: {'all': {...}} plus 'simple'/'hard' for MAT; counts and missing answers."""
  if benchmark not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(BENCHMARKS)}")
  spec = BENCHMARKS[benchmark]
  validate_predictions(items, source)
  if spec.num_items is not None and len(items) != spec.num_items:
    raise PredictionFileError(
        f"{source}: {spec.name} needs exactly {spec.num_items} items in benchmark order (the first "
        f"{spec.num_simple} are the simple split), got {len(items)}")
  f1s, ems = [], []
  for item in items:
    golds = [item["gt"]] if isinstance(item["gt"], str) else item["gt"]
    f1, em = metrics.score_item(item["pred_answer"], golds, cjk=spec.cjk)
    f1s.append(f1)
    ems.append(em)
  result = {
      "benchmark": benchmark,
      "name": spec.name,
      "num_missing": sum(i["pred_answer"] is None for i in items),
      "all": _split(f1s, ems)
  }
  if spec.num_simple is not None:
    result["simple"] = _split(f1s[:spec.num_simple], ems[:spec.num_simple])
    result["hard"] = _split(f1s[spec.num_simple:], ems[spec.num_simple:])
  return result


def format_table(result: dict) -> str:
  """A small text table of a score_predictions result."""
  rows = [s for s in ("simple", "hard", "all") if s in result]
  lines = [
      f"{result['name']}  ({result['num_missing']} missing answers)", f"{'split':<8}{'F1':>8}{'EM':>8}{'count':>8}"
  ]
  lines += [f"{s:<8}{result[s]['f1']:>8.2f}{result[s]['em']:>8.2f}{result[s]['count']:>8d}" for s in rows]
  settings = result.get("settings")
  if settings:  # an evaluation run's: which search backend and setting produced these predictions
    lines.append(f"search backend: {settings['search_backend'] or 'none'} (top {settings['search_topk']}, "
                 f"{settings['search_format']}); layout {settings['layout']}, rules {settings['agent_rules']}, "
                 f"stop at {settings['stop_at']}, repetition penalty {settings['repetition_penalty']:g}, "
                 f"crop overrides {result.get('crop_overrides', 0)}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m varft.eval.score", description=__doc__.split("\n")[0])
  parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
  parser.add_argument("file", help="prediction JSON (list of {pred_answer, gt, ...})")
  parser.add_argument("--out", help="write the scores here as JSON")
  args = parser.parse_args(argv)
  try:
    result = score_predictions(load_predictions(args.file), args.benchmark, args.file)
  except PredictionFileError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result["file"] = args.file
  print(format_table(result))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
