"""Run outputs on process 0: TensorBoard scalars, a metrics.jsonl log, and readable sample rollouts with images."""
from __future__ import annotations

import html
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from absl import logging


class MetricsWriter:
  """Scalars to TensorBoard (`<workdir>/tb`) and to `<workdir>/metrics.jsonl`; a no-op unless `enabled`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._texts_written: set[str] = set()
    if enabled:
      from tensorboardX import SummaryWriter
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: Mapping[str, float | str]) -> None:
    """Numbers become scalars; text values (a run's resolved choices) become text summaries, once per key."""
    if not self.enabled:
      return
    clean = {k: v if isinstance(v, str) else float(v) for k, v in sorted(metrics.items())}
    for key, value in clean.items():
      if not isinstance(value, str):
        self._tb.add_scalar(key, value, step)
      elif key not in self._texts_written:
        self._tb.add_text(key, value, step)
        self._texts_written.add(key)
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of `<workdir>/metrics.jsonl`; a step logged twice (a resumed run) keeps its last row."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows: dict[int, dict] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["step"]] = row
  return [rows[s] for s in sorted(rows)]


def _save_image(image: Any, path: str) -> None:
  import io
  from PIL import Image
  if isinstance(image, bytes):
    image = Image.open(io.BytesIO(image))
  elif isinstance(image, (str, os.PathLike)):
    image = Image.open(image)
  elif isinstance(image, np.ndarray):
    array = image
    if array.dtype != np.uint8:
      array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
  image.convert("RGB").save(path)


def write_samples(out_dir: str, step: int, samples: Sequence[Mapping[str, Any]]) -> str:
  """Writes `samples` as `<out_dir>/step_<step>.html` (+ PNGs) and returns the page's path.

  Each sample is a mapping with `text` (the transcript), optional `images` (PIL images, encoded bytes, arrays or
  paths, in the order they appear), and any scalar fields (reward, components, prompt id) shown in its header.
  """
  os.makedirs(out_dir, exist_ok=True)
  parts = [f"<html><head><meta charset='utf-8'><title>step {step}</title></head><body>",
           f"<h1>Sample rollouts at step {step}</h1>"]
  for i, sample in enumerate(samples):
    fields = {k: v for k, v in sample.items() if k not in ("text", "images")}
    header = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    parts.append(f"<h2>#{i}</h2><p>{html.escape(header)}</p>")
    for j, image in enumerate(sample.get("images") or ()):
      name = f"step_{step:06d}_{i:02d}_{j}.png"
      try:
        _save_image(image, os.path.join(out_dir, name))
        parts.append(f"<img src='{name}' style='max-width:360px;margin:4px'>")
      except Exception as e:  # a broken image must not stop training
        logging.warning("Sample %d image %d not written: %s", i, j, e)
        parts.append(f"<p>[image {j} not written: {html.escape(str(e))}]</p>")
    parts.append(f"<pre style='white-space:pre-wrap'>{html.escape(str(sample.get('text', '')))}</pre>")
  parts.append("</body></html>")
  path = os.path.join(out_dir, f"step_{step:06d}.html")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path
