"""Stop strings as suffixes of token classes: the table the sampler checks on device after each sampled token."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class StopTable(NamedTuple):
  """Stop strings as suffixes of token classes, checked on device after each sampled token.

  A stop string such as `</search>` spans several tokens and its first and last tokens vary with the neighbouring
  text (`</`, `?</`, `.</`; `>`, `>\\n`). Each (string, position) pair is one bit; `token_bits[v]` has the bits of
  every pair that token `v` may fill, and `pattern_bits[s]` holds string `s`'s bits right-aligned in a window of
  the last W tokens (0 = any token).
  """
  token_bits: np.ndarray  # (V,) int32
  pattern_bits: np.ndarray  # (S, W) int32
  strings: tuple[str, ...]


def _token_ids(tokenizer, text_: str) -> list[int]:
  ids = tokenizer.encode(text_)
  return list(ids.ids) if hasattr(ids, "ids") else list(ids)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
  """The decoded text of every token id below `vocab_size` ('' for ids the tokenizer does not know)."""
  known = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else tokenizer.get_vocab_size()
  texts = [tokenizer.decode([i]) for i in range(min(known, vocab_size))]
  return texts + [""] * (vocab_size - len(texts))


def make_stop_table(tokenizer, vocab_size: int, stop_strings: Sequence[str],
                    texts: Sequence[str] | None = None) -> StopTable:
  """Builds the token classes of each stop string from its canonical tokenization `p_1 .. p_n`.

  The first token may carry any text before `p_1` (`?</`), the last token any whitespace after `p_n` (`>\\n`),
  the middle tokens are exact. A one-token string matches any token that ends with it (up to trailing whitespace).
  No stop strings: a table whose one pattern no token fills (generation stops on EOS and budget only).
  """
  if not stop_strings:
    return StopTable(np.zeros((vocab_size,), np.int32), np.ones((1, 1), np.int32), ())
  texts = token_texts(tokenizer, vocab_size) if texts is None else list(texts)
  pieces = []
  for s in stop_strings:
    ids = _token_ids(tokenizer, s)
    if not ids or max(ids) >= vocab_size:
      raise ValueError(f"Stop string {s!r} tokenizes to {ids}: nothing, or ids beyond the model's vocabulary "
                       f"({vocab_size}); is this the model's tokenizer?")
    pieces.append([texts[i] for i in ids])
  num_pairs = sum(len(p) for p in pieces)
  if num_pairs > 31:
    raise ValueError(f"{len(stop_strings)} stop strings use {num_pairs} token positions; at most 31 fit.")
  window = max(len(p) for p in pieces)
  token_bits = np.zeros((vocab_size,), np.int64)
  pattern_bits = np.zeros((len(pieces), window), np.int32)
  bit = 0
  for s, parts in enumerate(pieces):
    n = len(parts)
    for j, part in enumerate(parts):
      if n == 1:
        members = [v for v, t in enumerate(texts) if t and t.rstrip().endswith(part)]
      elif j == 0:
        members = [v for v, t in enumerate(texts) if t.endswith(part)]
      elif j == n - 1:
        members = [v for v, t in enumerate(texts) if t.startswith(part) and not t[len(part):].strip()]
      else:
        members = [v for v, t in enumerate(texts) if t == part]
      token_bits[members] |= 1 << bit
      pattern_bits[s, window - n + j] = 1 << bit
      bit += 1
  return StopTable(token_bits.astype(np.int32), pattern_bits, tuple(stop_strings))
