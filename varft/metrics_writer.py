"""Run outputs on process 0: TensorBoard scalars, a metrics.jsonl log, and readable sample rollouts with images."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import html
import json
import os
from typing import Any

from absl import logging
import numpy as np


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

  def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
    """Sample rollouts as TensorBoard text (transcript without the agent prompt, reference beside it) and their
    images (the prompt's, then the ones the tools produced)."""
    if not self.enabled or not samples:
      return
    prompts_seen: dict[str, str] = {}
    for i, sample in enumerate(samples):
      text, used = split_system_prompts(str(sample.get("text", "")))
      prompts_seen.update(used)
      md = [f"**#{i}** {_header(sample)}"]
      if sample.get("reference"):
        md.append(f"**reference:** {sample['reference']}")
      md.append("\n".join("    " + line for line in text.splitlines()))
      self._tb.add_text(f"samples/{i}", "\n\n".join(md), step)
      for j, image in enumerate(sample.get("images") or ()):
        try:
          self._tb.add_image(f"samples/{i}/image_{j}", np.asarray(_to_pil(image)), step, dataformats="HWC")
        except (OSError, ValueError) as e:  # a broken image must not stop training
          logging.warning("Sample %d image %d not logged: %s", i, j, e)
    for name, prompt in prompts_seen.items():
      if f"prompt/{name}" not in self._texts_written:
        self._tb.add_text(f"prompt/{name}", "\n".join("    " + line for line in prompt.splitlines()), step)
        self._texts_written.add(f"prompt/{name}")
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


def split_system_prompts(text: str) -> tuple[str, dict[str, str]]:
  """`text` with each of the paper's agent prompts it holds replaced by a one-line marker, and those prompts by
  name: a page shows each prompt once instead of in every sample."""
  from varft import prompts
  used = {}
  for name, prompt in prompts.SYSTEM_PROMPTS.items():
    if prompt in text:
      text = text.replace(prompt, f"[{name} agent prompt, shown once above]\n")
      used[name] = prompt
  return text, used


def _header(sample: Mapping[str, Any]) -> str:
  fields = {k: v for k, v in sample.items() if k not in ("text", "images", "reference")}
  return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def _to_pil(image: Any):
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
  return image.convert("RGB")


def _save_image(image: Any, path: str) -> None:
  _to_pil(image).save(path)


def write_samples(out_dir: str, step: int, samples: Sequence[Mapping[str, Any]]) -> str:
  """Writes `samples` as `<out_dir>/step_<step>.html` (+ PNGs) and returns the page's path.

  Each sample is a mapping with `text` (the transcript), optional `images` (PIL images, encoded bytes, arrays or
  paths, in the order they appear), an optional `reference` (what the sample is scored against, shown beside the
  model's transcript), and any scalar fields (reward, components, prompt id) shown in its header. The paper's agent
  prompts are shown once at the top, not in every transcript.
  """
  os.makedirs(out_dir, exist_ok=True)
  texts, prompts_seen = [], {}
  for sample in samples:
    text, used = split_system_prompts(str(sample.get("text", "")))
    texts.append(text)
    prompts_seen.update(used)
  parts = [
      f"<html><head><meta charset='utf-8'><title>step {step}</title></head><body>",
      f"<h1>Sample rollouts at step {step}</h1>"
  ]
  for name, prompt in prompts_seen.items():
    parts.append(f"<details><summary>{html.escape(name)} agent prompt</summary>"
                 f"<pre style='white-space:pre-wrap'>{html.escape(prompt)}</pre></details>")
  for i, sample in enumerate(samples):
    parts.append(f"<h2>#{i}</h2><p>{html.escape(_header(sample))}</p>")
    for j, image in enumerate(sample.get("images") or ()):
      name = f"step_{step:06d}_{i:02d}_{j}.png"
      try:
        _save_image(image, os.path.join(out_dir, name))
        parts.append(f"<img src='{name}' style='max-width:360px;margin:4px'>")
      except Exception as e:  # noqa: BLE001 (a broken image must not stop training)
        logging.warning("Sample %d image %d not written: %s", i, j, e)
        parts.append(f"<p>[image {j} not written: {html.escape(str(e))}]</p>")
    transcript = f"<pre style='white-space:pre-wrap'>{html.escape(texts[i])}</pre>"
    if sample.get("reference"):
      reference = f"<pre style='white-space:pre-wrap'>{html.escape(str(sample['reference']))}</pre>"
      transcript = (f"<table style='width:100%'><tr><th>model</th><th>reference</th></tr><tr>"
                    f"<td style='vertical-align:top;width:65%'>{transcript}</td>"
                    f"<td style='vertical-align:top'>{reference}</td></tr></table>")
    parts.append(transcript)
  parts.append("</body></html>")
  path = os.path.join(out_dir, f"step_{step:06d}.html")
  with open(path, "w") as f:
    f.write("\n".join(parts))
  return path
