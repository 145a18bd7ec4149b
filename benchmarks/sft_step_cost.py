"""CPU seconds of one supervised update of the `tiny` preset by rows, row length and per-row logit slots.

    python benchmarks/sft_step_cost.py [--shapes 2x640x128x64,2x640x32,4x640x128] [--rounds 5]

Each shape is ROWSxLENGTHxSLOTS[xLOSS]: text rows, 3/4 of each row real, LOSS loss tokens per row at its end
(default SLOTS), the jitted `sft.make_sft_step` with `row_loss_tokens=SLOTS` (so SLOTS - LOSS are fill slots).
Prints the median process CPU time (user+sys of all threads, `time.process_time`) and wall time per update,
compile excluded: on a shared machine the CPU time is the figure that transfers to an idle one. Used to size the
demo warm-up (BENCHMARKS.md, issue 16 third pass).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from benchmarks.demo_update_profile import update_batch
from varft import grpo, sft
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text as text_model


def measure(rows: int, length: int, slots: int, loss_tokens: int, rounds: int) -> tuple[float, float]:
  """Median (CPU seconds, wall seconds) of one SFT update at this shape."""
  cfg = config_lib.get_config("tiny").replace(dtype="float32", remat=False, attention="dot_product")
  params = {"text": text_model.init_params(jax.random.key(0), cfg.text)}
  optimizer, _ = grpo.make_optimizer(1e-3, 100)
  scfg = sft.SFTConfig(logits_chunk=32)
  batch = sft.prepare_batch(update_batch(rows, length, loss_tokens), scfg)
  step = jax.jit(sft.make_sft_step(cfg, scfg, optimizer), static_argnames="row_loss_tokens", donate_argnums=0)
  state = grpo.init_train_state(params, optimizer)
  state, _ = step(state, batch, row_loss_tokens=slots)
  jax.block_until_ready(state)
  cpu, wall = [], []
  for _ in range(rounds):
    c0, w0 = time.process_time(), time.perf_counter()
    state, metrics = step(state, batch, row_loss_tokens=slots)
    jax.block_until_ready(metrics)
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
  return statistics.median(cpu), statistics.median(wall)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="2x640x128,2x640x128x64,2x640x32,4x640x128x64")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; tiny model, fp32, dot_product attention")
  print("| rows x length x slots (loss tokens per row) | CPU s / update | wall s / update |")
  print("|---|---|---|")
  for shape in args.shapes.split(","):
    rows, length, slots, *loss = (int(x) for x in shape.split("x"))
    loss_tokens = loss[0] if loss else slots
    cpu, wall = measure(rows, length, slots, loss_tokens, args.rounds)
    print(f"| {rows} x {length} x {slots} ({loss_tokens}) | {cpu:.3f} | {wall:.3f} |", flush=True)


if __name__ == "__main__":
  main()
