"""Training step time: the GRPO update against a PyTorch peer, and the whole step broken down.

    python benchmarks/train_step.py [--rounds 3] [--skip_breakdown]

1. Update, side by side in one process (CPU, fp32, text-only batch of N=8 rows x L=512 tokens, the last 64 of
   each sampled): varft's jitted `train_step` (AdamW, logits only at the sampled positions) vs the same GRPO loss in
   PyTorch on transformers' Qwen2.5-VL (the TRL recipe: full (N, L, V) logits -> log_softmax -> gather, AdamW).
   Medians of `rounds` timed updates after a warm-up; ratio = peer / varft (> 1: varft is faster).
2. Breakdown of full training steps on the embedded search demo (step-wise, real BM25 searches and rewards):
   rollout (sampler) / tools / rewards / update, median over steps 2.. of a short run.

Models: `tiny` (the preset: D=64, 2 layers, real 151,936-token vocabulary, ~10M parameters mostly embedding) and
`50m` (D=256, 4 layers, 4 heads, MLP 1024: ~46M parameters).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from varft import grpo
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import text as text_model

N, L, SAMPLED = 8, 512, 64


def model_config(name: str) -> config_lib.Qwen25VLConfig:
  tiny = config_lib.get_config("tiny")
  if name == "tiny":
    return tiny
  text = config_lib.TextConfig(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=2,
                               mrope_section=(8, 12, 12), max_position_embeddings=32768)
  return tiny.replace(
      text=text, vision=config_lib.VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                out_hidden_size=256, fullatt_block_indexes=(1,)))


def batch_arrays(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  loss_mask = np.zeros((N, L), np.float32)
  loss_mask[:, L - SAMPLED:] = 1
  return {
      "tokens": rng.integers(0, vocab, (N, L)).astype(np.int32),
      "attention_mask": np.ones((N, L), np.int32),
      "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (3, N, L)).copy(),
      "loss_mask": loss_mask,
      "old_logps": (-rng.uniform(5, 15, (N, L)) * loss_mask).astype(np.float32),
      "advantages": rng.normal(size=N).astype(np.float32)
  }


def time_varft(cfg, arrays, rounds: int) -> float:
  gcfg = grpo.GRPOConfig(beta=0.0)
  optimizer, _ = grpo.make_optimizer(1e-6, 100, schedule="constant")
  params = {"text": text_model.init_params(jax.random.key(0), cfg.text)}
  batch = {k: jnp.asarray(v) for k, v in arrays.items() if k not in ("old_logps", "advantages")}
  prepared = grpo.prepare_batch(batch, jnp.asarray(arrays["advantages"]), jnp.asarray(arrays["old_logps"]), gcfg)
  k = grpo.loss_token_bucket(arrays["loss_mask"])
  step = jax.jit(grpo.make_train_step(cfg, gcfg, optimizer), donate_argnums=0, static_argnames="num_loss_tokens")
  state = grpo.init_train_state(params, optimizer)
  state, metrics = step(state, prepared, num_loss_tokens=k)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    state, metrics = step(state, prepared, num_loss_tokens=k)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_torch(cfg, arrays, rounds: int) -> float:
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_lib.to_hf_config(cfg, "float32"))).float()
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
  t = {k: torch.from_numpy(v) for k, v in arrays.items()}
  tokens, mask = t["tokens"].long(), t["loss_mask"][:, 1:]

  def update():
    logits = model(input_ids=tokens, attention_mask=t["attention_mask"].long()).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]
    ratio = torch.exp(logps - t["old_logps"][:, 1:])
    adv = t["advantages"][:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  update()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    update()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def breakdown(name: str, steps: int) -> dict[str, float]:
  """Median per-step seconds of rollout / tools / rewards / update on the search demo."""
  from experiments import search
  from varft import metrics_writer, train
  config = search.get_config("demo")
  config.total_steps = steps
  config.checkpoint_every = 0
  config.samples_every = 0
  config.eval_every = 0
  config.export_hf = False
  model = model_config(name)
  original = train.model_config
  train.model_config = lambda c: model.replace(dtype=c.model.dtype, remat=c.model.remat)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      train.train(config, workdir)
      rows = metrics_writer.read_metrics(workdir)[1:]
  finally:
    train.model_config = original
  med = lambda key: statistics.median(r.get(key, 0.0) for r in rows)
  return {
      "rollout": med("time/rollout_s") - med("time/tools_s"),
      "tools": med("time/tools_s"),
      "rewards": med("time/rewards_s"),
      "update": med("time/update_s"),
      "step": med("time/step_s")
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--skip_breakdown", action="store_true")
  args = parser.parse_args()
  print(f"GRPO update, N={N} x L={L} tokens ({SAMPLED} sampled per row), CPU fp32, median of {args.rounds}")
  print("| model | params | varft (s) | PyTorch + transformers (s) | ratio peer/varft |")
  print("|---|---|---|---|---|")
  for name in ("tiny", "50m"):
    cfg = model_config(name)
    arrays = batch_arrays(cfg.text.vocab_size)
    shapes = jax.eval_shape(functools.partial(text_model.init_params, jax.random.key(0), cfg.text))
    size = sum(x.size for x in jax.tree.leaves(shapes))
    ours = time_varft(cfg, arrays, args.rounds)
    peer = time_torch(cfg, arrays, args.rounds)
    print(f"| {name} | {size / 1e6:.1f}M | {ours:.3f} | {peer:.3f} | {peer / ours:.2f} |", flush=True)
  if args.skip_breakdown:
    return
  print(f"\nFull training step on the search demo (2 prompts x G=4, step-wise), median of steps 2..{args.steps}")
  print("| model | rollout (s) | tools (s) | rewards (s) | update (s) | step (s) |")
  print("|---|---|---|---|---|---|")
  for name in ("tiny", "50m"):
    b = breakdown(name, args.steps)
    print(
        f"| {name} | {b['rollout']:.2f} | {b['tools']:.2f} | {b['rewards']:.2f} | {b['update']:.2f} | "
        f"{b['step']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
