"""Where a rollout generate / extend call's time goes, at b live rows of a 128-slot cache (the tiny model and the
rollout settings of `rollout_heterogeneous.py`: 64-token output buffer, 1088-slot cache rows, 64-token chunks).

For each b (gathered into `sampling.row_bucket(b)` rows when that is at most 3/4 of the slots, as the scheduler
does, else in place over every slot), the median over `--repeats` calls of:

* `host_args_ms`: building the per-row numpy arguments (budget, positions, recent, forced) and their upload;
* `dispatch_ms`: the jitted call returning (asynchronous dispatch);
* `call0_ms`: a whole call that runs 0 decode steps (`max_steps=0`), to the outputs being ready: the fixed device
  cost (the gather and write-back of the cache rows and their hidden states, the output buffers);
* `step_ms`: the cost of one decode step, from calls of 0 and `--steps` steps;
* `fetch_ms`: the device->host copy of the outputs the scheduler reads (tokens, log-probs, counts, reasons, ...);
* `rows_ms`: a take and put of b cache rows alone (donated, in place);
* `extend_ms`: an extend of a (b, 64) chunk into those rows.

(The rows' next-token state is their last hidden state (B, D), as in the scheduler; the section "Rollout engine v2:
the per-call cost" of BENCHMARKS.md compares it with the (B, V) logits kept before.)

And the scheduler's own Python per generate call (`--tasks` trajectories of the heterogeneous workload with
instant tools): the time of `Scheduler._decode` outside `Sampler.generate` and the output fetch.

    PYTHONPATH=. python benchmarks/rollout_call_profile.py [--rows 4 16 48 128] [--repeats 5]
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np

from tests.rollout import scripted
from varft import rollout, sampling, scheduler
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model, text
from varft.processing import chat

SLOTS, CACHE_LEN, NEW, CHUNK = 128, 1088, 64, 64


def _median_ms(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - start))
  return round(statistics.median(times), 2)


def _rows_ms(rows, repeats):
  """A take and put of the cache rows alone (donated, in place)."""
  cfg = config_lib.get_config("tiny").text
  rows = jnp.asarray(rows)
  cache_rt = jax.jit(lambda c, r: text.put_rows(c, r, jax.tree.map(lambda x: x + 0, text.take_rows(c, r))),
                     donate_argnums=(0,))
  state = {"cache": jax.block_until_ready(cache_rt(text.init_cache(cfg, SLOTS, CACHE_LEN), rows))}

  def cache_once():
    state["cache"] = jax.block_until_ready(cache_rt(state["cache"], rows))

  return _median_ms(cache_once, repeats)


def profile_calls(sampler, params, live: int, repeats: int, steps: int):
  """The per-call costs at `live` decoding rows (see the module doc)."""
  gathered = sampling.row_bucket(live) <= scheduler.GATHER_MAX_FRACTION * SLOTS
  width = sampling.row_bucket(live) if gathered else SLOTS
  rows = np.full((width,), -1, np.int32)
  rows[:live] = np.arange(live) * (SLOTS // live)
  state = {"cache": sampler.new_cache(SLOTS, CACHE_LEN), "hidden": sampler.empty_hidden(SLOTS)}
  chunk = sampling.text_chunk([[7] * 8] * width, [0] * width, CHUNK)
  budget = np.where(np.arange(width) < live, NEW, 0).astype(np.int32)

  def args():
    return (np.full((width,), 8, np.int32), jax.random.PRNGKey(0), budget)

  def call(max_steps):
    out, state["cache"] = sampler.generate(params, state["cache"], state["hidden"], *args(), None, None, recent=np.full(
        (width, sampler.stop_window), -1, np.int32), max_steps=max_steps, exit_after=width,
                                           rows=rows if gathered else None)
    state["hidden"] = out.hidden
    return out

  def host_args():
    positions, _, b = args()
    forced = np.full((width, NEW), -1, np.int32)
    recent = np.full((width, sampler.stop_window), -1, np.int32)
    jax.block_until_ready([jnp.asarray(x) for x in (positions, b, forced, recent, rows)])

  def dispatch():
    jax.block_until_ready(state.get("out"))
    start = time.perf_counter()
    state["out"] = call(0)
    return time.perf_counter() - start

  def fetch():
    out = state["out"]
    jax.device_get((out.tokens, out.logps, out.num_tokens, out.stop_reason, out.stop_index, out.steps))

  def extend():
    state["hidden"], state["cache"] = sampler.extend(params, state["cache"], chunk, hidden=state["hidden"],
                                                     rows=rows if gathered else None)
    jax.block_until_ready(state["hidden"])
    state["cache"]["length"] = jnp.zeros((SLOTS,), jnp.int32)  # keep room in the cache

  jax.block_until_ready(call(0))
  jax.block_until_ready(call(steps))
  extend()
  call0 = _median_ms(lambda: jax.block_until_ready(call(0)), repeats)
  callk = _median_ms(lambda: jax.block_until_ready(call(steps)), repeats)
  dispatch_ms = round(1e3 * statistics.median([dispatch() for _ in range(repeats)]), 2)
  jax.block_until_ready(state["out"])
  fetch_ms = _median_ms(fetch, repeats)
  return {
      "live": live,
      "program_rows": width,
      "gathered": gathered,
      "host_args_ms": _median_ms(host_args, repeats),
      "dispatch_ms": dispatch_ms,
      "call0_ms": call0,
      "step_ms": round((callk - call0) / steps, 2),
      "fetch_ms": fetch_ms,
      "rows_ms": _rows_ms(rows, repeats) if gathered else None,
      "extend_ms": _median_ms(extend, repeats),
  }


def profile_scheduler(config, params, tasks: int):
  """The scheduler's Python per generate call: `_decode` outside `Sampler.generate` + the output fetch."""
  from benchmarks import rollout_heterogeneous as hetero
  tokenizer = chat.load_tokenizer()
  examples, tool_turns, free, _ = hetero.workload(tasks)
  actions = {t: tokenizer.encode(f"<search> query {t} </search>") for t in range(1, 7)}
  answer = tokenizer.encode("<answer> Paris </answer>")
  engine = scripted.ScriptedEngine(
      config, tokenizer, scripted.InstantSearch(),
      rollout.RolloutConfig(mode="multiturn", max_turns=6, max_new_tokens=NEW, max_total_tokens=1024,
                            length_buckets=(512, 1024), chunk_buckets=(CHUNK,), temperature=1.0),
      script=lambda i, t: free[(i, t)] + (actions[t] if t <= tool_turns[i] else answer))
  spent = {"decode": 0.0, "generate": 0.0, "calls": 0}
  decode, generate = scheduler.Scheduler._decode, sampling.Sampler.generate

  def timed_decode(self, *a, **k):
    start = time.perf_counter()
    decode(self, *a, **k)
    spent["decode"] += time.perf_counter() - start
    spent["calls"] += 1

  def timed_generate(self, *a, **k):
    start = time.perf_counter()
    out = jax.block_until_ready(generate(self, *a, **k))
    spent["generate"] += time.perf_counter() - start
    return out

  engine.run(params, examples, jax.random.PRNGKey(0))  # compiles
  scheduler.Scheduler._decode, sampling.Sampler.generate = timed_decode, timed_generate
  try:
    result = engine.run(params, examples, jax.random.PRNGKey(1))
  finally:
    scheduler.Scheduler._decode, sampling.Sampler.generate = decode, generate
  calls = spent["calls"]
  return {
      "tasks": tasks,
      "generate_calls": calls,
      "python_ms_per_call": round(1e3 * (spent["decode"] - spent["generate"]) / calls, 2),
      "generate_ms_per_call": round(1e3 * spent["generate"] / calls, 2),
      "run_s": result.stats["run_s"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, nargs="+", default=[4, 16, 48, 128])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--tasks", type=int, default=32, help="trajectories of the scheduler profile (0: skip)")
  args = parser.parse_args()
  config = config_lib.get_config("tiny")
  params = model.init_params(jax.random.PRNGKey(0), config)
  tokenizer = chat.load_tokenizer()
  eos = (tokenizer.im_end_id, tokenizer.end_of_text_id)
  stop_table = sampling.make_stop_table(tokenizer, config.text.vocab_size, ("</search>", "</answer>"))
  sampler = sampling.Sampler(config, sampling.SamplingConfig(1.0, max_new_tokens=NEW, eos_ids=eos), stop_table)
  load = [os.getloadavg()[0]]
  calls = [profile_calls(sampler, params, live, args.repeats, args.steps) for live in args.rows]
  for c in calls:
    print(json.dumps(c), flush=True)
  summary = {"calls": calls}
  if args.tasks:
    summary["scheduler"] = profile_scheduler(config, params, args.tasks)
  summary["load_average"] = load + [os.getloadavg()[0]]
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
