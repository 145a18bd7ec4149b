"""Evaluation runs: a benchmark's items streamed through the eval engine, predictions gathered across hosts, scored
with the paper's rules and written next to their score tables.

`env` is the agent environment (`varft.agent_task.AgentEnvironment`): its `eval_engine`, `config` and
`eval_settings`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
from typing import Any

from absl import logging
import jax

from varft import rollout as rollout_lib
from varft import sharding
from varft.eval import metrics, score, settings
from varft.processing import image as image_lib


def host_items(num_items: int) -> range:
  """This host's contiguous block of `num_items` items: the hosts, in process order, cover every item in order (the
  first hosts take one more when the count does not divide), so the gathered predictions keep the benchmark's
  order, which its positional splits (MAT's simple / hard) rely on."""
  per_host, extra = divmod(num_items, jax.process_count())
  host = jax.process_index()
  start = host * per_host + min(host, extra)
  return range(start, start + per_host + (host < extra))


EVAL_STREAM_BATCHES = 8


def evaluate_source(env, name: str, source: Sequence[Mapping[str, Any]], params, rng,
                    out_dir: str | None) -> dict[str, float]:
  """`agent_task.evaluate_benchmark` on a random-access `source`: the first `eval.num_prompts` items (all when 0),
  each host its own contiguous block (`host_items`), predictions gathered in item order."""
  limit = env.config.eval.num_prompts
  mine = host_items(min(len(source), limit) if limit else len(source))
  transform = image_lib.square_resizer(settings.eval_resize(env.config)) or (lambda example: example)
  size = env.config.eval.batch_size
  # The agent engine streams a run's items through `size` device slots (a finished trajectory's slot takes the next
  # item); a run holds at most EVAL_STREAM_BATCHES batches' items, which bounds the images it keeps.
  streaming = isinstance(env.eval_engine, rollout_lib.RolloutEngine)
  per_run = size * EVAL_STREAM_BATCHES if streaming else size
  items = []
  for first in range(mine.start, mine.stop, per_run):
    examples = [transform(source[i]) for i in range(first, min(first + per_run, mine.stop))]
    # The key of a run is its first item's index (greedy eval: the same predictions whatever the number of hosts).
    key = jax.random.fold_in(rng, first)
    if streaming:
      result = env.eval_engine.run(params, examples, key, num_samples=1, slots=size)
    else:
      result = env.eval_engine.run(params, examples, key, num_samples=1)
    answered = {t.example_id: t for t in result.transcripts}
    for j, ex in enumerate(examples):
      t = answered.get(str(ex.get("id", j)))
      items.append({
          "id": ex.get("id"),
          "question": ex["question"],
          "pred_answer": t.answer if t else None,
          "gt": list(ex.get("answers") or []),
          "trajectory": t.render() if t else "",
          "stop_reason": t.stop_reason if t else "skipped",
          "crop_overrides": sum(o.get("crop_override", False) for o in t.observations) if t else 0
      })
  items = [item for per_host in sharding.gather_json(items) for item in per_host]
  result = score_items(items, name)
  result["settings"] = env.eval_settings
  result["crop_overrides"] = sum(item["crop_overrides"] for item in items)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
      json.dump(items, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, f"{name}_scores.json"), "w") as f:
      json.dump(result, f, indent=2)
    table = score.format_table(result)
    with open(os.path.join(out_dir, f"{name}_scores.txt"), "w") as f:
      f.write(table + "\n")
    logging.info("Eval %s:\n%s", name, table)
  out = {
      f"eval/{name}/f1": result["all"]["f1"],
      f"eval/{name}/em": result["all"]["em"],
      f"eval/{name}/answered": 1.0 - result["num_missing"] / max(len(items), 1)
  }
  return out


def score_items(items: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
  """The paper's scores; a subset of a MAT benchmark (e.g. the demo, eval.num_prompts) is scored as one split."""
  spec = score.BENCHMARKS.get(name)
  if spec is not None and (spec.num_items is None or spec.num_items == len(items)):
    return score.score_predictions(list(items), name)
  cjk = bool(spec and spec.cjk)
  f1s, ems = [], []
  for item in items:
    golds = [item["gt"]] if isinstance(item["gt"], str) else list(item["gt"])
    f1, em = metrics.score_item(item["pred_answer"], golds, cjk=cjk)
    f1s.append(f1)
    ems.append(em)
  mean = lambda v: 100.0 * sum(v) / len(v) if v else 0.0
  return {
      "benchmark": name,
      "name": f"{spec.name if spec else name} ({len(items)} items)",
      "num_missing": sum(i["pred_answer"] is None for i in items),
      "all": {
          "f1": mean(f1s),
          "em": mean(ems),
          "count": len(items)
      }
  }
