"""Mesh construction, sharding rules, and sharded / multi-process steps equal to the single-device step."""
import os
import socket
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from varft import rollout_sharding, sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def test_mesh_shape_fills_the_rest_and_names_bad_axes():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.mesh_shape({"data": 2, "tensor": 2}, 8)


def test_logical_axes_by_parameter_path():
  assert sharding.logical_axes(("text", "layers", "q", "w"), 3) == ("layers", "embed", "heads")
  assert sharding.logical_axes(("opt", "0", "mu", "text", "embed"), 2) == ("vocab", "embed")
  assert sharding.logical_axes(("vision", "merger", "fc2", "w"), 2) == ("mlp", "embed")
  assert sharding.logical_axes(("text", "layers", "attn_norm"), 2) == (None, None)
  with pytest.raises(ValueError, match="text/layers/q/w has 2 dims"):
    sharding.logical_axes(("text", "layers", "q", "w"), 2)


_COMPARE = """
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from tests.trainer import step_script
reference, _ = step_script.run({"data": 1}, jax.devices()[:1])
for axes in ({"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
  flat, shardings = step_script.run(axes)
  q = shardings["params"]["text"]["layers"]["q"]["w"].spec
  mu = shardings["opt_state"].inner_state[1][0].mu["text"]["layers"]["q"]["w"].spec
  print("SPEC", axes, q, mu)
  worst = max(float(np.max(np.abs(flat[k] - reference[k]))) for k in reference)
  print("DIFF", worst)
"""


def test_sharded_step_on_8_devices_equals_single_device():
  out = subprocess.run([sys.executable, "-c", _COMPARE], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  specs = [l for l in lines if l.startswith("SPEC")]
  diffs = [float(l.split()[1]) for l in lines if l.startswith("DIFF")]
  assert len(diffs) == 2 and max(diffs) <= 1e-5, out.stdout
  # The layouts really are sharded: q/w (and AdamW's mu like it) over fsdp on `embed`, tensor on `heads`.
  assert "P(None, 'fsdp', None) P(None, 'fsdp', None)" in specs[0]
  assert "P(None, 'fsdp', 'tensor') P(None, 'fsdp', 'tensor')" in specs[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
  one = tmp_path / "one.npz"
  subprocess.run(
      [sys.executable, "-m", "tests.trainer.step_script", str(one)], cwd=REPO, env=_env(), check=True,
      capture_output=True, timeout=300)
  two = tmp_path / "two.npz"
  port = str(_free_port())
  procs = [
      subprocess.Popen([sys.executable, "-m", "tests.trainer.step_script",
                        str(two), str(i), "2", port], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True) for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  a, b = np.load(one), np.load(two)
  assert sorted(a.files) == sorted(b.files)
  for key in a.files:
    np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
  assert not np.allclose(a["['text']['embed']"], 0)


def test_shard_batch_rejects_rows_the_mesh_cannot_split():
  from varft import batch_placement
  mesh = sharding.make_mesh({"data": -1})
  local = {"tokens": np.zeros((2, 3), np.int32), "positions": np.zeros((3, 2, 3), np.int32)}
  batch = batch_placement.shard(local, mesh)
  assert batch["positions"].sharding.spec == P(None, ("data", "fsdp"))
  assert sharding.spec_for(("vocab", "embed"), (10, 4), mesh) == P(None, None)


class _MeshShape:
  """Only what `spec_for` reads from a mesh: its axis sizes (no devices needed)."""

  def __init__(self, **shape):
    self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_every_parameter_of_the_vision_language_model_gets_a_valid_spec():
  from varft.models.qwen25vl import config as config_lib
  from varft.models.qwen25vl import model
  cfg = config_lib.get_config("tiny")
  shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
  mesh = _MeshShape(fsdp=4, tensor=2)
  specs = sharding.tree_specs(shapes, mesh)
  flat = {
      jax.tree_util.keystr(p): s
      for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  }
  assert flat["['text']['embed']"] == P("tensor", "fsdp")
  assert flat["['vision']['blocks']['qkv']['w']"] == P(None, "fsdp", "tensor")
  assert flat["['vision']['merger']['fc2']['w']"] == P("tensor", "fsdp")
  assert flat["['vision']['blocks']['norm1']"] == P(None, None)
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    spec = flat[jax.tree_util.keystr(path)]
    for dim, axes in zip(leaf.shape, spec):
      size = 1 if axes is None else np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))])
      assert dim % size == 0, (path, spec)


def test_one_process_on_8_devices_compiles_nothing_after_the_first_step(tmp_path):
  out = subprocess.run([sys.executable, "-m", "tests.trainer.rollout_script",
                        str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode == 0, out.stderr[-3000:]
  host = np.load(tmp_path / "out_0.npz")
  assert int(host["rollout_devices"]) == 8
  assert host["compiles"][0] > 0 and list(host["compiles"][1:]) == [0, 0], host["compiles"]


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_two_hosts_sample_their_own_prompts_from_sharded_params(tmp_path, tensor_parallel):
  from tests.trainer import rollout_script
  port = str(_free_port())
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")  # 2 hosts x 2 devices: params over 4
  procs = [
      subprocess.Popen([
          sys.executable, "-m", "tests.trainer.rollout_script",
          str(tmp_path / "out"),
          str(i), "2", port,
          str(tensor_parallel)
      ], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  hosts = [np.load(tmp_path / f"out_{i}.npz") for i in range(2)]
  assert not np.array_equal(hosts[0]["shown"], hosts[1]["shown"])
  for host in hosts:  # the first step compiles its programs; the next two reuse them (no per-step reshard compile)
    assert host["compiles"][0] > 0 and list(host["compiles"][1:]) == [0, 0], host["compiles"]
    # Sampling weights: a replica per device, or split over the host's two devices.
    assert str(host["q_spec"]) == ("P(None, None, 'tensor')"
                                   if tensor_parallel == 2 else "P(None, None, None)"), host["q_spec"]
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  params = rollout_script.init_params(mesh)
  for host in hosts:
    assert int(host["rollout_devices"]) == 2  # this host's devices only
    env = rollout_script.echo_task.EchoEnvironment(rollout_script.MODEL, mesh, prompts_per_host=4, num_samples=2)
    expected, _ = env._rollout(params, host["shown"], jax.random.key(1), greedy=True)
    np.testing.assert_array_equal(host["tokens"], expected["tokens"])
    np.testing.assert_allclose(host["sampler_logps"], expected["sampler_logps"], atol=1e-5)


def test_two_host_evaluation_keeps_item_order_and_drops_nothing(tmp_path):
  import json
  port = str(_free_port())
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "tests.trainer.eval_script",
           str(tmp_path), str(i), "2", port], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True) for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  mat = json.loads((tmp_path / "mat_search.json").read_text())
  assert [item["id"] for item in mat] == [f"m-{i}" for i in range(150)]
  scores = json.loads((tmp_path / "mat_search_scores.json").read_text())
  # Positional splits: the stub is right exactly on the first 75 (simple) items.
  assert scores["simple"]["em"] == 100.0 and scores["hard"]["em"] == 0.0, scores
  multihop = json.loads((tmp_path / "multihop_demo.json").read_text())
  assert [item["id"] for item in multihop] == [f"h-{i}" for i in range(7)]
  assert json.loads((tmp_path / "multihop_demo_scores.json").read_text())["all"]["count"] == 7


class _Device:

  def __init__(self, limit, process_index=0):
    self.limit, self.process_index = limit, process_index

  def memory_stats(self):
    return None if self.limit is None else {"bytes_limit": self.limit}


def test_sampling_weights_are_replicated_when_they_fit_and_tensor_parallel_when_not():
  gib = 1 << 30
  devices = [_Device(16 * gib)] * 8
  assert rollout_sharding.sampling_tensor_parallel(3 * gib, devices) == 1  # 3B in bf16 on 16 GiB
  assert rollout_sharding.sampling_tensor_parallel(15 * gib, devices) == 2  # 7B in bf16: 7.5 GiB per device
  assert rollout_sharding.sampling_tensor_parallel(20 * gib, devices) == 4
  assert rollout_sharding.sampling_tensor_parallel(20 * gib,
                                                   [_Device(16 * gib)] * 2) == 2  # no more devices to split over
  assert rollout_sharding.sampling_tensor_parallel(20 * gib, [_Device(None)] * 8) == 1  # CPU: no memory limit known
  with pytest.raises(ValueError, match="does not divide this host's 1 devices"):
    rollout_sharding.rollout_mesh(sharding.make_mesh({"data": 1}, jax.devices()[:1]), 2)
