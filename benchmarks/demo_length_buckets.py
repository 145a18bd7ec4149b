"""The demos' GRPO update at each row-length bucket: the same rows padded to 640, 768 or 1024 tokens.

    python -m benchmarks.demo_length_buckets [--demo search|coding] [--lengths 640,768,1024] [--rounds 5]

A GRPO step's rows are padded to the smallest of `rollout.length_buckets` holding its longest row, and the update
computes every padded position. This times the jitted `train_step` of a demo config (its model, attention, logit
slots and logits chunk; 16 rows, each 560 real tokens of which the last 40 carry the loss) at each length. Rounds
interleave the lengths (640, 768, 1024, 640, ...), so a change in the machine's load falls on all of them alike;
medians after one warm-up call each (compile excluded), and each length's ratio to the longest.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import demo_update_profile
from experiments import coding, search
from varft import grpo, run_config, train
from varft.models.qwen25vl import model

ROWS, REAL, SAMPLED = 16, 560, 40


def update_fns(demo: str, lengths: list[int]):
  """One jitted update per length, each a zero-argument callable, at the demo config's settings."""
  config = {"search": search, "coding": coding}[demo].get_config("demo")
  cfg = train.model_config(config)
  gcfg = run_config.grpo_config(config)
  optimizer, _ = train.make_optimizer(config)
  state = grpo.init_train_state(model.init_params(jax.random.key(0), cfg), optimizer)
  slots = grpo.turn_loss_slots(config.rollout.max_new_tokens)
  step = jax.jit(grpo.make_train_step(cfg, gcfg, optimizer), static_argnames="row_loss_tokens")
  fns = {}
  for length in lengths:
    batch = demo_update_profile.update_batch(ROWS, length, SAMPLED, real=REAL)
    prepared = grpo.prepare_batch(batch, jnp.ones((ROWS,)), jnp.zeros((ROWS, length)), gcfg)
    fns[length] = lambda prepared=prepared: step(state, prepared, row_loss_tokens=slots)
  return fns


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--demo", default="search", choices=("search", "coding"))
  parser.add_argument("--lengths", default="640,768,1024")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  fns = update_fns(args.demo, lengths)
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {length: [] for length in lengths}
  for _ in range(args.rounds):
    for length, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[length].append(time.perf_counter() - start)
  print(f"{args.demo} demo's GRPO update, {ROWS} rows x {REAL} real tokens; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; medians of {args.rounds} interleaved rounds")
  longest = statistics.median(times[max(lengths)])
  print("| row length | update (s) | vs the longest |")
  print("|---|---|---|")
  for length in lengths:
    median = statistics.median(times[length])
    print(f"| {length} | {median:.2f} | {median / longest:.2f} |")


if __name__ == "__main__":
  main()
