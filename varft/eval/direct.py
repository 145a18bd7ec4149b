"""Direct-answer baselines, as the paper's `evaluation_*_df.py` scripts make them (`config.eval.prompt='direct'`).

One user turn (the chat template's default system turn, the image if the item has one, the question and an
instruction: `prompts.direct_answer_text`), no agent prompt, no tools; the reply runs to EOS (2048 new tokens) and
all of it, decoded without special tokens, is the prediction. The engine answers like `rollout.RolloutEngine.run`
for one sample per example (transcripts whose answer is the reply), so the benchmark loop and the scorers are the
agent evaluation's own.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from varft import actions as actions_lib
from varft import batch as batch_lib
from varft import prompts, rollout, sampling
from varft.models.qwen25vl import rope
from varft.models.qwen25vl.config import Qwen25VLConfig
from varft.processing import chat
from varft.processing import image as image_lib

MAX_NEW_TOKENS = 2048  # the df scripts' `generate(max_new_tokens=2048)`


def never_stop_table(vocab_size: int) -> sampling.StopTable:
  """A stop table no token sequence matches (its one pattern needs a bit no token has): generation ends at EOS or
  the token budget only."""
  return sampling.StopTable(np.zeros((vocab_size,), np.int32), np.ones((1, 1), np.int32), ())


def direct_messages(example: Mapping[str, Any]) -> list[dict[str, Any]]:
  images = list(example.get("images") or ())
  content = [{"type": "image"} for _ in images]
  content.append({"type": "text", "text": prompts.direct_answer_text(example["question"], bool(images))})
  return [{"role": "user", "content": content}]


class DirectAnswerEngine:
  """Greedy (or sampled) single-turn answers of a Qwen2.5-VL policy; `run` returns a `rollout.RolloutResult`
  without a training batch."""

  def __init__(self, model_config: Qwen25VLConfig, tokenizer: chat.Tokenizer, config: rollout.RolloutConfig, *,
               mesh: jax.sharding.Mesh | None = None, max_new_tokens: int = MAX_NEW_TOKENS):
    self.model_config = model_config
    self.tokenizer = tokenizer
    self.config = config
    eos = (tokenizer.im_end_id, tokenizer.end_of_text_id)
    sampling_config = sampling.SamplingConfig(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                              max_new_tokens=max_new_tokens, eos_ids=eos)
    self.sampler = sampling.Sampler(model_config, sampling_config, never_stop_table(model_config.text.vocab_size),
                                    mesh=mesh)
    self.max_new_tokens = max_new_tokens

  def prompt(self, example: Mapping[str, Any],
             key: str = "0") -> tuple[batch_lib.Row, dict[str, batch_lib.Image], int, str]:
    """(the prompt as a batch row, its images by `key`:i, the next text position, the rendered text)."""
    cfg, vision = self.config, self.model_config.vision
    images = {}
    for i, source in enumerate(example.get("images") or ()):
      patches, grid = image_lib.process_image(source, cfg.image_min_pixels, cfg.image_max_pixels)
      images[f"{key}:{i}"] = batch_lib.Image(patches, np.asarray(grid, np.int64))
    rendered = chat.render_messages(direct_messages(example))
    grids = [im.grid for im in images.values()] or None
    ids = chat.expand_image_pads(self.tokenizer.encode(rendered), grids, vision.spatial_merge_size,
                                 self.tokenizer.image_pad_id)
    positions, _ = rope.sequence_positions(np.asarray([ids]), grids, self.model_config)
    keys, local = [None] * len(ids), [-1] * len(ids)
    slots = iter(np.flatnonzero(np.asarray(ids) == self.tokenizer.image_pad_id))
    for key, image in images.items():
      for j in range(int(np.prod(image.grid)) // vision.spatial_merge_size ** 2):
        t = next(slots)
        keys[t], local[t] = key, j
    row = batch_lib.Row(0, ids, positions[:, 0], [], [], keys, local)
    return row, images, int(positions.max()) + 1, rendered

  def scripted_tokens(self, index: int) -> Sequence[int] | None:
    """Tokens to force at the start of example `index`'s reply (None: all sampled); a scripted policy (tests)
    overrides this."""
    del index
    return None

  def run(self, params, examples: Sequence[Mapping[str, Any]], rng: jax.Array,
          num_samples: int = 1) -> rollout.RolloutResult:
    """One answer per example."""
    if num_samples != 1:
      raise ValueError("direct-answer baselines take one sample per example")
    start = time.perf_counter()
    prompted = []
    for b, example in enumerate(examples):
      try:
        row, images, next_position, rendered = self.prompt(example, str(b))
        if len(row.tokens) > max(self.config.length_buckets):
          raise ValueError(f"prompt of {len(row.tokens)} tokens exceeds the largest length bucket "
                           f"{max(self.config.length_buckets)}")
      except (image_lib.ImageError, OSError, ValueError, KeyError) as e:
        logging.warning("Skipping example %r: %s", example.get("id"), e)
        continue
      prompted.append((b, row, images, next_position, rendered))
    if not prompted:
      raise ValueError(f"No example of {len(examples)} could be prompted.")
    shards = self.sampler.num_shards
    num_rows = -(-len(prompted) // shards) * shards
    length = sampling.bucket(max(len(p[1].tokens) for p in prompted), self.config.length_buckets)
    rows = [p[1] for p in prompted] + [batch_lib.Row(0, [], np.zeros(
        (3, 0), np.int32), [], [], [], [])] * (num_rows - len(prompted))
    hidden, cache = self._prefill(params, rows, {k: v for p in prompted for k, v in p[2].items()}, length)
    budget = np.asarray([self.max_new_tokens] * len(prompted) + [0] * (num_rows - len(prompted)), np.int32)
    forced = np.full((num_rows, self.max_new_tokens), -1, np.int32)
    for r, (b, *_) in enumerate(prompted):
      ids = list(self.scripted_tokens(b) or ())[:self.max_new_tokens]
      forced[r, :len(ids)] = ids
    next_positions = [p[3] for p in prompted] + [0] * (num_rows - len(prompted))
    repetition = None
    if self.config.repetition_penalty != 1.0:  # the checkpoint generation config's (1.05), over the prompt too
      context = np.full((num_rows, length + self.max_new_tokens), -1, np.int32)
      for r, (_, row, *_) in enumerate(prompted):
        context[r, :len(row.tokens)] = row.tokens
      repetition = (context, np.full((num_rows,), self.config.repetition_penalty, np.float32))
    out, _ = self.sampler.generate(params, cache, hidden, next_positions, rng, budget, forced, repetition)
    out = jax.device_get(out)
    transcripts = []
    for r, (b, row, images, _, rendered) in enumerate(prompted):
      new = out.tokens[r, :int(out.num_tokens[r])]
      reply = self.tokenizer.decode(new, skip_special_tokens=True)
      t = rollout.Transcript(str(examples[b].get("id", b)), r, 0, num_tokens=len(row.tokens) + len(new),
                             stop_reason="answer" if int(out.stop_reason[r]) == sampling.EOS else "max_new_tokens")
      t.messages = [{
          "role": "user",
          "text": rendered,
          "images": [f"prompt:{i}" for i in range(len(images))]
      }, {
          "role": "assistant",
          "text": reply,
          "images": []
      }]
      t.actions = [actions_lib.Action("answer", reply)]
      transcripts.append(t)
    stats = {
        "num_trajectories": len(transcripts),
        "skipped": len(examples) - len(prompted),
        "generate_s": round(time.perf_counter() - start, 4)
    }
    return rollout.RolloutResult(None, transcripts, stats)

  def _prefill(self, params, rows, images, length):
    """Extends an empty cache with the prompt rows, each device encoding its own rows' images."""
    vision = self.model_config.vision
    n = len(rows)
    tokens, mask = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
    positions, image_index = np.zeros((3, n, length), np.int32), np.full((n, length), -1, np.int32)
    for b, row in enumerate(rows):
      m = len(row.tokens)
      tokens[b, :m], mask[b, :m], positions[:, b, :m] = row.tokens, 1, row.positions
    tables = None
    if images:
      per_device, index = batch_lib.device_images(rows, images, self.sampler.num_shards, vision)
      image_index[:, :index.shape[1]] = index
      max_patches = self.config.image_max_pixels // vision.patch_size ** 2
      patches = sampling.bucket(batch_lib.table_patches(per_device, vision), self.config.patch_buckets,
                                beyond="multiple")
      built = batch_lib.image_tables(per_device, vision, patches, batch_lib.key_blocks(patches, max_patches, vision))
      tables = (built["pixel_values"], built["vision_inputs"])
    cache = self.sampler.new_cache(n, length + self.max_new_tokens)
    return self.sampler.extend(params, cache, sampling.Chunk(tokens, positions, mask, image_index), images=tables)
