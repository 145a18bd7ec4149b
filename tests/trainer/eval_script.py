"""Evaluation of a stub policy on one or several jax.distributed processes (each host its share of the items).

    python -m tests.trainer.eval_script OUT_DIR [PROCESS_ID NUM_PROCESSES PORT]

MAT-Search (150 items) and a 7-item multi-hop set (divisible by neither the hosts nor the batch size); process 0
writes the gathered predictions and scores under OUT_DIR.
"""
from __future__ import annotations

import sys
import types

import jax
import ml_collections

from varft import sharding
from varft.eval import stream


class StubEngine:
  """Answers MAT-Search item i with its gold answer when i < 75 (its simple split), wrongly otherwise; answers a
  multi-hop item with its id."""

  def run(self, params, examples, rng, num_samples=1):
    transcripts = []
    for ex in examples:
      index = int(ex["id"].split("-")[1])
      answer = ex["answers"][0] if ex["id"].startswith("h") or index < 75 else "wrong"
      transcripts.append(
          types.SimpleNamespace(example_id=ex["id"], answer=answer, stop_reason="answer", render=lambda: "",
                                observations=[]))
    return types.SimpleNamespace(transcripts=transcripts)


def main(out_dir: str) -> None:
  config = ml_collections.ConfigDict({"eval": {"num_prompts": 0, "batch_size": 4, "resize": -1}, "data": {"resize": 0}})
  env = types.SimpleNamespace(config=config, eval_engine=StubEngine(), eval_settings={})
  sources = {
      "mat_search": [{
          "id": f"m-{i}",
          "question": "q",
          "answers": [f"gold {i}"]
      } for i in range(150)],
      "multihop_demo": [{
          "id": f"h-{i}",
          "question": "q",
          "answers": [f"h-{i}"]
      } for i in range(7)]
  }
  for name, source in sources.items():
    stream.evaluate_source(env, name, source, None, jax.random.key(0), out_dir if sharding.is_writer() else None)


if __name__ == "__main__":
  if len(sys.argv) > 2:
    process_id, num_processes, port = (int(a) for a in sys.argv[2:5])
    sharding.initialize_distributed(True, f"localhost:{port}", num_processes, process_id)
  main(sys.argv[1])
