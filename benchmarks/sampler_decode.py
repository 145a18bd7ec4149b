"""Decode throughput: varft's jitted KV-cache sampler vs transformers `generate` (torch, CPU), same weights.

Batch 16 rows, a 64-token prompt, 128 new tokens per row, sampling at temperature 1 with top-k 50 on both sides
(neither stops early: no EOS ids on either side). Three text configs:

  small  ~1M params: hidden 64, 2 layers, 16,384-token vocabulary (overhead-bound)
  tiny   the `tiny` preset: hidden 64, 2 layers, the real 151,936-token vocabulary
  40m    ~40M params: hidden 512, 8 layers (8 heads, 2 KV heads), 16,384-token vocabulary (compute-bound)

For each: median wall time of prefill + 128 decode steps on each side (alternating rounds, after a warm-up), tokens/s
and the ratio; and the physical limit: a jitted loop of only the decode step's matmuls at the same shapes (the
q/k/v/o and MLP projections of every layer, attention against the fixed cache, the vocabulary projection), compared
with our decode step time.

    PYTHONPATH=. python benchmarks/sampler_decode.py [--repeats 5] [--configs small,tiny,40m]
"""
import argparse
import json
import os
import statistics
import time

# One thread per side: on a shared 2-core machine torch's 2 OpenMP threads slow it down several times over.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from varft import sampling
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import hf
from varft.processing import chat

BATCH, PROMPT, NEW = 16, 64, 128
TOP_K = 50
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[0])
CONFIGS = {
    "small": dict(vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
    "tiny": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3]),
    "40m": dict(vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, mrope_section=[8, 12, 12]),
}


def build(name: str):
  spec = dict(CONFIGS[name])
  section = spec.pop("mrope_section")
  text = dict(spec, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True, rope_parameters={
      "rope_type": "default",
      "rope_theta": 1000000.0,
      "mrope_section": section
  })
  hf_config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(TINY_VISION, out_hidden_size=spec["hidden_size"]),
                               tie_word_embeddings=True)
  hf_config._attn_implementation = "sdpa"
  torch.manual_seed(0)
  torch_model = Qwen2_5_VLForConditionalGeneration(hf_config).eval()
  torch_model.generation_config.eos_token_id = None  # never stop early: exactly NEW tokens per row
  torch_model.generation_config.pad_token_id = 0
  config = config_lib.from_hf_config(hf_config.to_dict())
  params = hf.params_from_state_dict(torch_model.state_dict(), config)
  return config, params, torch_model


def text_param_count(config) -> int:
  t = config.text
  hd = t.head_dim
  per_layer = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd + (t.num_heads + 2 * t.num_kv_heads) * hd +
               t.num_heads * hd * t.hidden_size + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size)
  return t.num_layers * per_layer + t.vocab_size * t.hidden_size + t.hidden_size


def matmul_loop(config, cache_len: int):
  """A jitted loop of NEW steps of only the decode step's matmuls, on random weights of the same shapes."""
  t = config.text
  d, hd, f = t.hidden_size, t.head_dim, t.intermediate_size
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
  w = {
      name: 0.02 * jax.random.normal(next(keys), shape) for name, shape in {
          "q": (t.num_layers, d, t.num_heads * hd),
          "k": (t.num_layers, d, t.num_kv_heads * hd),
          "v": (t.num_layers, d, t.num_kv_heads * hd),
          "o": (t.num_layers, t.num_heads * hd, d),
          "gate": (t.num_layers, d, f),
          "up": (t.num_layers, d, f),
          "down": (t.num_layers, f, d),
          "embed": (t.vocab_size, d)
      }.items()
  }
  cache = jnp.zeros((t.num_layers, BATCH, cache_len, t.num_kv_heads, hd))
  groups = t.num_heads // t.num_kv_heads

  @jax.jit
  def run(w, cache, x):

    def step(_, x):

      def layer(x, lw):
        wl, ck, cv = lw
        q = (x @ wl["q"]).reshape(BATCH, t.num_kv_heads, groups, hd)
        k, v = x @ wl["k"], x @ wl["v"]
        scores = jnp.einsum("bkgd,bskd->bkgs", q, ck) + (k.sum() + v.sum()) * 0
        attn = jnp.einsum("bkgs,bskd->bkgd", scores, cv).reshape(BATCH, -1)
        x = x + attn @ wl["o"]
        x = x + (jax.nn.silu(x @ wl["gate"]) * (x @ wl["up"])) @ wl["down"]
        return x, None

      layers = {k: w[k] for k in ("q", "k", "v", "o", "gate", "up", "down")}
      x, _ = jax.lax.scan(layer, x, (layers, cache, cache))
      logits = jnp.einsum("bd,vd->bv", x, w["embed"])  # tied embeddings, as text.logits
      return x + logits[:, :d] * 1e-9

    return jax.lax.fori_loop(0, NEW, step, x)

  x = jnp.ones((BATCH, d))
  return lambda: run(w, cache, x).block_until_ready()


def median_times(fns, repeats):
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def bench(name: str, repeats: int, tokenizer):
  config, params, torch_model = build(name)
  rng = np.random.default_rng(0)
  prompt = rng.integers(0, min(config.text.vocab_size, 150000), (BATCH, PROMPT)).astype(np.int32)
  table = sampling.make_stop_table(tokenizer, config.text.vocab_size, ("</search>", "</code>", "</answer>"))
  sampler = sampling.Sampler(config,
                             sampling.SamplingConfig(temperature=1.0, top_k=TOP_K, max_new_tokens=NEW, eos_ids=()),
                             table)
  cache_len = PROMPT + NEW
  chunk = sampling.text_chunk(prompt.tolist(), [0] * BATCH, PROMPT)
  decode_times, counts = [], []

  def ours():
    hidden, cache = sampler.extend(params, sampler.new_cache(BATCH, cache_len), chunk)
    hidden.block_until_ready()
    start = time.perf_counter()
    out, _ = sampler.generate(params, cache, hidden, [PROMPT] * BATCH, jax.random.PRNGKey(0), [NEW] * BATCH)
    counts.append(int(np.asarray(out.num_tokens).sum()))
    decode_times.append(time.perf_counter() - start)

  input_ids = torch.from_numpy(prompt.astype(np.int64))
  mask = torch.ones_like(input_ids)

  def theirs():
    with torch.no_grad():
      out = torch_model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=TOP_K,
                                 top_p=1.0, max_new_tokens=NEW)
    assert out.shape == (BATCH, PROMPT + NEW)

  matmuls = matmul_loop(config, cache_len)
  ours_s, theirs_s, matmul_s = median_times([ours, theirs, matmuls], repeats)
  assert all(c == BATCH * NEW for c in counts), counts
  tokens = BATCH * NEW
  decode_step = statistics.median(decode_times[1:]) / NEW
  return {
      "config": name,
      "text_params_m": round(text_param_count(config) / 1e6, 1),
      "ours_tok_s": round(tokens / ours_s),
      "transformers_tok_s": round(tokens / theirs_s),
      "speedup": round(theirs_s / ours_s, 2),
      "our_decode_step_ms": round(1e3 * decode_step, 3),
      "matmul_step_ms": round(1e3 * matmul_s / NEW, 3),
      "step_vs_matmul_limit": round(decode_step / (matmul_s / NEW), 2),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--configs", default="small,tiny,40m")
  args = parser.parse_args()
  torch.set_num_threads(1)
  tokenizer = chat.load_tokenizer()
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); batch {BATCH}, prompt {PROMPT}, {NEW} new tokens, top-k {TOP_K}")
  for name in args.configs.split(","):
    print(json.dumps(bench(name, args.repeats, tokenizer)), flush=True)


if __name__ == "__main__":
  main()
