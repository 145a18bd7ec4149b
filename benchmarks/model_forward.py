"""Prefill forward of a mid-size Qwen2.5-VL: varft (jax.jit) vs transformers (torch, CPU), same weights and inputs.

Config: text hidden 512, 8 layers (8 heads, 2 KV heads), vision hidden 256, 4 blocks (block 3 full attention, the
others 112-px windows), the real 151,936-token vocabulary (`--vocab` to change it). Batch 4; each row: 127 text
tokens, <|vision_start|>, one 448x448 image (32x32 patches -> 256 image tokens), <|vision_end|>, 126 text tokens
(511 tokens).

    PYTHONPATH=. python benchmarks/model_forward.py [--repeats 5] [--batch 4] [--vocab 151936]

Prints the median wall time of each side over `--repeats` alternating forwards (after one warm-up), their ratio, our
compile time, the max logit difference (fp32), and the same timing for the vision tower alone. Our time includes the
host work of `apply` (M-RoPE positions, window index arrays); transformers computes the same inside its forward.
"""
import argparse
import json
import statistics
import time

import jax
import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import hf, model, vision


def hf_config(vocab: int) -> Qwen2_5_VLConfig:
  text = dict(vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
              rope_parameters={
                  "rope_type": "default",
                  "rope_theta": 1000000.0,
                  "mrope_section": [8, 12, 12]
              })
  vision = dict(depth=4, hidden_size=256, intermediate_size=768, num_heads=4, out_hidden_size=512,
                fullatt_block_indexes=[3], window_size=112, tokens_per_second=2)
  # A smaller vocabulary moves the special tokens to its end (the real ids would not fit).
  special = {} if vocab > config_lib.IMAGE_TOKEN_ID else dict(image_token_id=vocab - 1, video_token_id=vocab -
                                                              2, vision_start_token_id=vocab -
                                                              3, vision_end_token_id=vocab - 4)
  return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)


def inputs(batch: int, rng: np.random.Generator, config: config_lib.Qwen25VLConfig):
  grid = np.array([1, 32, 32])
  text_ids = min(150000, config.text.vocab_size - 4)
  rows = []
  for _ in range(batch):
    rows.append(
        np.concatenate([
            rng.integers(0, text_ids, 127), [config.vision_start_token_id],
            np.full(256, config.image_token_id), [config.vision_end_token_id],
            rng.integers(0, text_ids, 126)
        ]))
  input_ids = np.stack(rows).astype(np.int64)
  pixel_values = rng.standard_normal((batch * 1024, 1176)).astype(np.float32)
  return input_ids, np.ones_like(input_ids), pixel_values, np.tile(grid, (batch, 1))


def timed_alternating(fns, repeats: int) -> tuple[list[float], list[list[float]]]:
  """First-call time of each function, then `repeats` rounds calling them in turn (so that load changes on a
  shared machine hit both sides alike)."""
  first = []
  for fn in fns:
    start = time.perf_counter()
    fn()
    first.append(time.perf_counter() - start)
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return first, times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=151936)
  args = parser.parse_args()

  torch.manual_seed(0)
  cfg = hf_config(args.vocab)
  torch_model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
  config = config_lib.from_hf_config(cfg.to_dict())
  params = hf.params_from_state_dict(torch_model.state_dict(), config)
  input_ids, mask, pixel_values, grids = inputs(args.batch, np.random.default_rng(0), config)
  torch_inputs = dict(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                      pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grids),
                      mm_token_type_ids=torch.from_numpy((input_ids == config.image_token_id).astype(np.int64)))

  def ours():
    return model.apply(params, config, input_ids, mask, pixel_values, grids).block_until_ready()

  def theirs():
    with torch.inference_mode():
      return torch_model(**torch_inputs).logits

  vision_inputs = vision.vision_inputs(grids, config.vision)
  encode = jax.jit(model.encode_images, static_argnums=1)

  def ours_vision():
    return encode(params, config, pixel_values, vision_inputs).block_until_ready()

  def theirs_vision():
    with torch.inference_mode():
      return torch_model.model.visual(torch_inputs["pixel_values"], grid_thw=torch_inputs["image_grid_thw"])

  prepared = model.prepare_inputs(config, input_ids, mask, pixel_values, grids)
  start = time.perf_counter()
  model._apply_jit.lower(params, config, prepared["input_ids"], prepared["attention_mask"], prepared["positions"],
                         prepared["pixel_values"], prepared["vision_inputs"], prepared["image_index"]).compile()
  ours_compile = time.perf_counter() - start

  (_, theirs_first), (ours_times, theirs_times) = timed_alternating([ours, theirs], args.repeats)
  _, (ours_vision_times, theirs_vision_times) = timed_alternating([ours_vision, theirs_vision], args.repeats)
  diff = float(np.abs(np.asarray(ours()) - theirs().numpy()).max())
  ours_median, theirs_median = statistics.median(ours_times), statistics.median(theirs_times)
  result = {
      "device": str(jax.devices()[0]),
      "torch_threads": torch.get_num_threads(),
      "batch": args.batch,
      "tokens_per_row": int(input_ids.shape[1]),
      "patches": int(pixel_values.shape[0]),
      "vocab": args.vocab,
      "ours_median_s": round(ours_median, 3),
      "transformers_median_s": round(theirs_median, 3),
      "speedup": round(theirs_median / ours_median, 2),
      "vision_tower_ours_median_s": round(statistics.median(ours_vision_times), 3),
      "vision_tower_transformers_median_s": round(statistics.median(theirs_vision_times), 3),
      "vision_tower_speedup": round(statistics.median(theirs_vision_times) / statistics.median(ours_vision_times), 2),
      "ours_compile_s": round(ours_compile, 2),
      "transformers_first_call_s": round(theirs_first, 3),
      "ours_times_s": [round(t, 3) for t in ours_times],
      "transformers_times_s": [round(t, 3) for t in theirs_times],
      "max_abs_logit_diff": diff,
  }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
