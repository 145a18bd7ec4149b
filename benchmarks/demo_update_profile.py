"""Where a tiny-model demo update spends its time: attention, the 152k-vocabulary logits, the optimizer.

    python benchmarks/demo_update_profile.py [--lengths 512,768,1024] [--rounds 3]

For each row length L (8 rows, text only, 3/4 of each row real, 24 sampled tokens per row as in the demo), times
the jitted pieces of one update on the `tiny` preset (D=64, 2 layers, 151,936-token vocabulary, fp32, no remat):
the decoder forward+backward, the attention alone (the model's `auto` implementation), the vocabulary log-probs at
each row's loss slots (forward+backward, as the GRPO step computes them), AdamW, the whole GRPO `train_step`, the
reference forward (`grpo.beta > 0`), and the SFT step at the demo's SFT shape (2 rows). Medians of `rounds` calls
after a warm-up (compile excluded).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from varft import grpo, sft
from varft.models.qwen25vl import attention as attention_lib
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text as text_model

ROWS, SAMPLED = 8, 24


def _time(fn, rounds: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def update_batch(rows: int, length: int, loss_tokens: int = SAMPLED, real: int | None = None) -> dict:
  """Random text rows of `length` tokens, `real` of them real (default 3/4), the last `loss_tokens` real ones
  carrying the loss."""
  rng = np.random.default_rng(0)
  real = length * 3 // 4 if real is None else real
  mask = np.zeros((rows, length), np.int32)
  mask[:, :real] = 1
  loss = np.zeros((rows, length), np.float32)
  loss[:, real - loss_tokens:real] = 1
  return {
      "tokens": jnp.asarray(rng.integers(0, 5000, (rows, length)), jnp.int32),
      "attention_mask": jnp.asarray(mask),
      "loss_mask": jnp.asarray(loss),
      "positions": jnp.asarray(np.broadcast_to(np.arange(length), (3, rows, length)), jnp.int32)
  }


def profile(length: int, rounds: int) -> dict[str, float]:
  cfg = config_lib.get_config("tiny").replace(dtype="float32", remat=False)
  params = {"text": text_model.init_params(jax.random.key(0), cfg.text)}
  batch = update_batch(ROWS, length)
  gcfg = grpo.GRPOConfig(beta=0.0)
  optimizer, _ = grpo.make_optimizer(1e-4, 100)
  slots = grpo.row_loss_token_bucket(batch["loss_mask"])
  out = {}
  decoder = lambda p, e: text_model.forward(p["text"], cfg.text, e, batch["positions"], attention_mask=batch[
      "attention_mask"])[0]
  embeds = jnp.zeros((ROWS, length, cfg.text.hidden_size))
  grad_decoder = jax.jit(jax.grad(lambda p, e: decoder(p, e).sum(), argnums=(0, 1)))
  out["decoder fwd+bwd (2 layers)"] = _time(lambda: grad_decoder(params, embeds), rounds)
  heads, kv, hd = cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.head_dim
  q, k = jnp.ones((ROWS, length, heads, hd)), jnp.ones((ROWS, length, kv, hd))
  slot = jnp.broadcast_to(jnp.arange(length), (ROWS, length))
  valid = batch["attention_mask"] > 0
  attend = lambda q, k: attention_lib.attend(q, k, k, slot, valid, cfg.attention, from_slot_zero=True).sum()
  attention = jax.jit(jax.grad(attend, argnums=(0, 1)))
  out["attention fwd+bwd (1 layer)"] = _time(lambda: attention(q, k), rounds)
  hidden = jnp.ones((ROWS, slots, cfg.text.hidden_size))
  targets = jnp.zeros((ROWS, slots), jnp.int32)
  vocab = jax.jit(jax.grad(lambda p: grpo._chunked_logps(p["text"], cfg.text, hidden, targets, 1.0, 256)[0].sum()))
  out[f"vocab log-probs fwd+bwd ({ROWS} x {slots} slots)"] = _time(lambda: vocab(params), rounds)
  update = jax.jit(lambda g, s: optimizer.update(g, s, params))
  opt_state = optimizer.init(params)
  out["AdamW update"] = _time(lambda: update(params, opt_state), rounds)
  logps = jax.jit(grpo.make_logps_fn(cfg, gcfg), static_argnames="row_loss_tokens")
  out["reference forward (beta > 0)"] = _time(lambda: logps(params, batch, row_loss_tokens=slots), rounds)
  prepared = grpo.prepare_batch(batch, jnp.ones((ROWS,)), jnp.zeros((ROWS, length)), gcfg)
  step = jax.jit(grpo.make_train_step(cfg, gcfg, optimizer), static_argnames="row_loss_tokens")
  state = grpo.init_train_state(params, optimizer)
  out["GRPO train_step"] = _time(lambda: step(state, prepared, row_loss_tokens=slots), rounds)
  sft_rows = update_batch(2, length)
  sft_batch = sft.prepare_batch(sft_rows, sft.SFTConfig())
  sft_step = jax.jit(sft.make_sft_step(cfg, sft.SFTConfig(), optimizer), static_argnames="row_loss_tokens")
  sft_slots = grpo.row_loss_token_bucket(sft_rows["loss_mask"])
  out["SFT step (2 rows)"] = _time(lambda: sft_step(state, sft_batch, row_loss_tokens=sft_slots), rounds)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="512,768,1024")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {ROWS} rows, tiny model, fp32")
  results = {length: profile(length, args.rounds) for length in lengths}
  names = list(results[lengths[0]])
  print("| piece | " + " | ".join(f"L={n} (s)" for n in lengths) + " |")
  print("|---|" + "---|" * len(lengths))
  for name in names:
    print(f"| {name} | " + " | ".join(f"{results[n][name]:.2f}" for n in lengths) + " |")


if __name__ == "__main__":
  main()
