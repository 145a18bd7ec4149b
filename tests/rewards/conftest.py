import hashlib

import numpy as np
import pytest


class FakeEmbedder:
  """Deterministic bag-of-character-hash embeddings: similar strings get similar vectors."""
  dim = 16

  def __call__(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, text in enumerate(texts):
      out[i, 0] = 1.0
      for ch in text:
        out[i, hashlib.md5(ch.encode("utf-8", "surrogatepass")).digest()[0] % self.dim] += 1.0
    return out

  def similarity(self, a, b):
    x, y = self([a, b])
    return float(np.dot(x, y) / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-8))


@pytest.fixture
def fake_embedder():
  return FakeEmbedder()
