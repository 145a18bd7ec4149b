"""Data loading: varft's array_record + grain pipeline vs the paper's loader, side by side.

The paper's trainer (Visual-ARFT, `grpo_agent_code.py`) reads the step-wise JSON and, per sample,
opens the image file with PIL and resizes it to 720x720. varft reads the same samples from the
prepared array_record files through the grain pipeline (shuffle + batch) and does the same
decode + resize, so both sides do identical image work and differ only in how records are
stored, looked up and shuffled.

    python benchmarks/data_pipeline.py [--items 300] [--repeats 5]

Prints the median examples/s of each side over `--repeats` full shuffled passes and their ratio,
with the paper's per-sample image work and for record access alone.
"""
import argparse
import functools
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from varft.data import builders, demo, input_pipeline

RESIZE = (720, 720)


def _resize_bytes(data: bytes) -> Image.Image:
  return Image.open(io.BytesIO(data)).convert('RGB').resize(RESIZE)


def ours(source, seed: int, resize: bool) -> int:
  n = 0
  for batch in input_pipeline.batches(source, batch_size=8, seed=seed, num_epochs=1, drop_remainder=False,
                                      shard=(0, 1)):
    for example in batch:
      if resize:
        _resize_bytes(example['images'][0])
      n += 1
  return n


def paper(json_path: str, image_dir: str, seed: int, resize: bool) -> int:
  with open(json_path) as f:
    rows = json.load(f)
  n = 0
  for i in np.random.default_rng(seed).permutation(len(rows)):
    path = os.path.join(image_dir, rows[int(i)]['image_path'])
    if resize:
      Image.open(path).convert('RGB').resize(RESIZE)
    else:
      with open(path, 'rb') as f:
        f.read()
    n += 1
  return n


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--items', type=int, default=300, help='coding training items (~3 steps each)')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  tfds.display_progress_bar(False)
  with tempfile.TemporaryDirectory() as tmp:
    paths = demo.generate(tmp, sizes=demo.Sizes(coding_training=args.items))
    t = time.perf_counter()
    source = builders.load('mat_training/coding', manual_dir=paths['mat_dir'])
    prepare_s = time.perf_counter() - t
    json_path = os.path.join(paths['mat_dir'], 'MAT-Training', 'rft_agent_code_1_2k.json')
    image_dir = os.path.join(paths['mat_dir'], 'MAT-Training', 'rft_agent_code_1_2k_images')
    rates = {}
    for r in range(args.repeats):
      for resize in (True, False):
        sides = (('varft', functools.partial(ours, source, r,
                                             resize)), ('paper',
                                                        functools.partial(paper, json_path, image_dir, r, resize)))
        for side, fn in sides:
          t = time.perf_counter()
          n = fn()
          rates.setdefault((resize, side), []).append(n / (time.perf_counter() - t))
  print(f'{len(source)} step samples; one-time TFDS preparation {prepare_s:.2f} s')
  for resize, work in ((True, 'records + decode + resize 720x720'), (False, 'records + image bytes')):
    ours_rate = statistics.median(rates[(resize, 'varft')])
    paper_rate = statistics.median(rates[(resize, 'paper')])
    print(f'  {work:34s} varft {ours_rate:9.1f}/s  paper {paper_rate:9.1f}/s  '
          f'ratio {ours_rate / paper_rate:.2f}x  (medians of {args.repeats})')


if __name__ == '__main__':
  main()
