"""HF safetensors folders in and out: both naming schemes, sharded files, bf16, sharded placement, export."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests import hf_tiny  # noqa: E402
from varft.models import qwen25vl  # noqa: E402
from varft.models.qwen25vl import config as config_lib  # noqa: E402
from varft.models.qwen25vl import hf, model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """Tied, float32, one file, transformers-5 names."""
  return hf_tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("plain"), tie=True)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
  """Untied, bfloat16, three shards, legacy hub names and flat config.json."""
  return hf_tiny.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("legacy"), tie=False, dtype="bfloat16", sharded=True,
                                         legacy_keys=True, seed=3)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_load_transformers5_single_file(plain):
  path, torch_model = plain
  config, params = qwen25vl.load_pretrained(path, dtype=jnp.float32)
  assert config.dtype == "float32" and config.text.tie_word_embeddings
  _assert_trees_equal(params, hf.params_from_state_dict(torch_model.state_dict(), config))
  # The tree matches what init_params builds for the same config.
  init_shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), config))
  assert jax.tree.map(lambda x: x.shape, init_shapes) == jax.tree.map(lambda x: x.shape, params)


def test_load_legacy_sharded_bf16(legacy):
  path, torch_model = legacy
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  assert "text_config" not in json.load(open(os.path.join(path, "config.json")))
  config, params = qwen25vl.load_pretrained(path, dtype=jnp.bfloat16)
  assert config.dtype == "bfloat16" and not config.text.tie_word_embeddings
  tiny = config_lib.get_config("tiny")
  assert config == tiny.replace(dtype="bfloat16", text=dataclasses.replace(tiny.text, tie_word_embeddings=False))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  _assert_trees_equal(params, hf.params_from_state_dict(torch_model.state_dict(), config, jnp.bfloat16))


def test_export_round_trip_through_transformers(plain, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  path, torch_model = plain
  config, params = qwen25vl.load_pretrained(path, dtype=jnp.float32)
  out = qwen25vl.save_pretrained(params, config, str(tmp_path / "export"), dtype=jnp.float32,
                                 max_shard_bytes=4 * 1024 ** 2, tokenizer_dir=path)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
  ids = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 0, 151645]])
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(input_ids=ids).logits.numpy(), torch_model(input_ids=ids).logits.numpy())
  _, params_again = qwen25vl.load_pretrained(out, dtype=jnp.float32)
  _assert_trees_equal(params_again, params)


def test_export_bf16_untied(legacy, tmp_path):
  path, _ = legacy
  config, params = qwen25vl.load_pretrained(path, dtype=jnp.bfloat16)
  out = qwen25vl.save_pretrained(params, config, str(tmp_path / "bf16"))
  stored = hf.SafetensorsFolder(out)
  assert {e.dtype for e in stored.entries.values()} == {np.dtype(ml_dtypes.bfloat16)}
  assert "lm_head.weight" in stored and "model.language_model.layers.1.self_attn.q_proj.bias" in stored
  _, again = qwen25vl.load_pretrained(out, dtype=jnp.bfloat16)
  _assert_trees_equal(again, params)


def test_clear_errors(plain, tmp_path):
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.SafetensorsFolder(str(tmp_path))
  path, torch_model = plain
  broken = tmp_path / "broken"
  broken.mkdir()
  state = {k: v for k, v in torch_model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
  state.pop("lm_head.weight")
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in state.items()}, str(broken / "model.safetensors"))
  (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  with pytest.raises(ValueError, match="layers.1.mlp.up_proj.weight"):
    qwen25vl.load_pretrained(str(broken))


SHARDED_LOAD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from varft.models.qwen25vl import hf

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    reads = []
    original_read = hf.SafetensorsFolder.read
    def recording_read(self, name, index=()):
      out = original_read(self, name, index)
      reads.append((name, out.size, int(np.prod(self.entries[name].shape))))
      return out
    hf.SafetensorsFolder.read = recording_read

    def sharding(path):
      return NamedSharding(mesh, P("model", None) if path[-1] == "embed" else P())
    config, params = hf.load_pretrained({path!r}, dtype=jnp.float32, shardings=sharding)
    embed = params["text"]["embed"]
    assert embed.sharding.spec == P("model", None), embed.sharding
    assert len(embed.addressable_shards) == 8
    embed_reads = [r for r in reads if r[0].endswith("embed_tokens.weight")]
    # Each device's callback read only its quarter of the vocabulary.
    assert embed_reads and all(size * 4 == full for _, size, full in embed_reads), embed_reads
    hf.SafetensorsFolder.read = original_read
    _, plain = hf.load_pretrained({path!r}, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = params["text"]["layers"]["q"]["w"]
    assert q.sharding.spec == P() and q.shape == plain["text"]["layers"]["q"]["w"].shape
    print("OK")
""")


def test_sharded_load_reads_only_each_devices_slice(legacy):
  path, _ = legacy
  script = SHARDED_LOAD.format(repo=REPO, path=path)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
