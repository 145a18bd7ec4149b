"""Cost of the sampler's repetition penalty: greedy decode with and without it, same weights and shapes.

The `tiny` preset (hidden 64, 2 layers, the real 151,936-token vocabulary, where the (B, V) penalty work is the
largest share of a step), batch 16, a 64-token prompt, 128 new tokens per row (no early stop), a 256-slot cache and
context. The penalised run also builds each row's seen-token table from its context once per call. Median of
`--repeats` rounds after a warm-up, sides alternating.

    PYTHONPATH=. python benchmarks/repetition_penalty.py [--repeats 5]
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import numpy as np

from varft import sampling
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text

BATCH, PROMPT, NEW, CACHE = 16, 64, 128, 256


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  cfg = config_lib.get_config("tiny")
  params = {"text": text.init_params(jax.random.PRNGKey(0), cfg.text)}
  table = sampling.StopTable(np.zeros((cfg.text.vocab_size,), np.int32), np.ones((1, 1), np.int32), ())
  sampler = sampling.Sampler(cfg, sampling.SamplingConfig(temperature=0, max_new_tokens=NEW, eos_ids=()), table)
  rows = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (BATCH, PROMPT)).tolist()
  context = np.full((BATCH, CACHE), -1, np.int32)
  context[:, :PROMPT] = rows
  penalty = np.full((BATCH,), 1.05, np.float32)

  def run(repetition):
    hidden, cache = sampler.extend(params, sampler.new_cache(BATCH, CACHE),
                                   sampling.text_chunk(rows, [0] * BATCH, PROMPT))
    jax.block_until_ready(hidden)
    start = time.perf_counter()
    out, _ = sampler.generate(params, cache, hidden, [PROMPT] * BATCH, jax.random.PRNGKey(0), [NEW] * BATCH,
                              repetition=repetition)
    jax.block_until_ready(out.tokens)
    return time.perf_counter() - start

  sides = {"plain": None, "penalty 1.05": (context, penalty)}
  for repetition in sides.values():
    run(repetition)
  times = {name: [] for name in sides}
  for _ in range(args.repeats):
    for name, repetition in sides.items():
      times[name].append(run(repetition))
  result = {
      name: {
          "decode_s": round(statistics.median(t), 4),
          "step_ms": round(1000 * statistics.median(t) / NEW, 3)
      } for name, t in times.items()
  }
  result["overhead"] = round(result["penalty 1.05"]["decode_s"] / result["plain"]["decode_s"] - 1, 3)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
