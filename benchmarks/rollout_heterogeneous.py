"""Heterogeneous agent rollouts: rollout engine v2 (continuous batching) vs the lock-step schedule, same tiny model.

Workload (fixed seed): 128 search trajectories (text prompts), each making 1-5 tool turns and then answering; each
turn decodes 4-40 free tokens (drawn, then replaced by fixed ordinary text tokens so that no free token is an EOS
and both sides decode the same sequences) before its action (`<search> q </search>`, the last `<answer> a
</answer>`), and each search is answered by a local fake tool after its own latency, drawn from 0.05-1.0 s. Both
sides run the same `RolloutEngine` with the same executor (calls start when submitted, in parallel); they differ only
in the schedule:

* continuous (v2): a row that stops goes to its tool at once and rejoins when its observation is ready, the others
  keep decoding;
* lockstep (the previous engine's order): every row decodes until the last one stopped, then the whole batch waits
  for the slowest tool, then every row is extended;
* v2 streaming: the continuous engine on `--slots` device slots (fewer than the tasks, as evaluation runs): a
  finished trajectory's slot takes the next task.

Reported: tasks/s of each (median of `--repeats` runs, the sides interleaved, after an untimed warm-up run of each
on the same workload, which compiles the programs), the ratios to lock-step, the fraction of the rows the generate
calls computed that decoded a live row (v2 computes the decoding rows only, gathered, when they are few; lock-step
every slot), the rows computed by decode steps and by extends, the programs compiled after the warm-up, and the
load average during the timed runs.

    PYTHONPATH=. python benchmarks/rollout_heterogeneous.py [--tasks 128] [--repeats 3]
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import numpy as np

from tests.rollout import scripted
from varft import prompts, rollout, sampling
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model
from varft.processing import chat
from varft.tools.executor import Observation

PASSAGE = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."


class SlowSearch:
  """A local fake search tool: call `i:t` (trajectory i, turn t) answers after `latency[(i, t)]` seconds."""

  def __init__(self, latency):
    self.latency = latency
    self.pool = concurrent.futures.ThreadPoolExecutor(256)

  def _answer(self, call):
    i, t = map(int, call.call_id.split(":"))
    time.sleep(self.latency[(i, t)])
    return Observation(prompts.search_observation([f"{call.payload}: {PASSAGE}"]), None, True, None, 0.0, "search",
                       call.call_id)

  def submit(self, call):
    return self.pool.submit(self._answer, call)

  def execute(self, calls):
    return [f.result() for f in [self.submit(c) for c in calls]]


def workload(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tool_turns = rng.integers(1, 6, n)
  free = {(i, t): rng.integers(300, 20000, int(rng.integers(4, 41))).tolist() for i in range(n) for t in range(1, 7)}
  latency = {(i, t): float(rng.uniform(0.05, 1.0)) for i in range(n) for t in range(1, 7)}
  tasks = [{
      "id": str(i),
      "task": "search",
      "question": f"Where is landmark {i}?",
      "answers": ["Paris"]
  } for i in range(n)]
  return tasks, tool_turns, free, latency


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--slots", type=int, nargs="*", default=[32, 64],
                      help="device slots of the streaming sides (none: no streaming side)")
  args = parser.parse_args()
  config = config_lib.get_config("tiny")
  params = model.init_params(jax.random.PRNGKey(0), config)
  tokenizer = chat.load_tokenizer()
  tasks, tool_turns, free, latency = workload(args.tasks)
  actions = {t: tokenizer.encode(f"<search> query {t} </search>") for t in range(1, 7)}
  answer = tokenizer.encode("<answer> Paris </answer>")

  def script(i, t):
    return free[(i, t)] + (actions[t] if t <= tool_turns[i] else answer)

  executor = SlowSearch(latency)
  engines = {
      schedule: scripted.ScriptedEngine(
          config, tokenizer, executor,
          rollout.RolloutConfig(mode="multiturn", max_turns=6, max_new_tokens=64, max_total_tokens=1024,
                                length_buckets=(512, 1024), chunk_buckets=(64,), temperature=1.0, schedule=schedule),
          script=script) for schedule in ("continuous", "lockstep")
  }
  sides = {"v2": (engines["continuous"], None), "lockstep": (engines["lockstep"], None)}
  sides.update({f"v2_streaming_{n}": (engines["continuous"], n) for n in args.slots})
  times = {s: [] for s in sides}
  stats, loads = {}, []
  for i in range(args.repeats + 1):
    if i == 1:
      warm_compiles = sampling.Sampler.compile_count()
    loads.append(os.getloadavg()[0])
    for side, (engine, slots) in sides.items():
      start = time.perf_counter()
      result = engine.run(params, tasks, jax.random.PRNGKey(i), slots=slots)
      if i:
        times[side].append(time.perf_counter() - start)
        assert result.stats["stop_reasons"]["answer"] == len(tasks), result.stats["stop_reasons"]
        assert result.stats["tool_calls"] == int(tool_turns.sum())
        stats[side] = result.stats
      print(side, i, round(time.perf_counter() - start, 2), round(result.stats["live_slot_fraction"], 3),
            result.stats["decode_steps"], flush=True)
  rates = {s: args.tasks / statistics.median(t) for s, t in times.items()}
  keys = ("generate_s", "extend_s", "prefill_s", "tools_wait_s", "generate_calls", "extends", "decode_steps",
          "decode_rows", "extend_rows", "live_occupied_fraction")
  summary = {
      "tasks": args.tasks,
      "slots_streaming": args.slots,
      "tool_calls": int(tool_turns.sum()),
      "tasks_s": {
          s: round(r, 3) for s, r in rates.items()
      },
      "speedup_vs_lockstep": {
          s: round(r / rates["lockstep"], 2) for s, r in rates.items()
      },
      "live_slot_fraction": {
          s: round(stats[s]["live_slot_fraction"], 3) for s in stats
      },
      "runs_s": {
          s: [round(x, 2) for x in t] for s, t in times.items()
      },
      "breakdown": {
          s: {
              k: stats[s].get(k) for k in keys
          } for s in stats
      },
      "compiles_after_warm_up": sampling.Sampler.compile_count() - warm_compiles,
      "load_average": [round(x, 1) for x in loads[1:] + [os.getloadavg()[0]]],
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
