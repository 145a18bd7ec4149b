"""The batch schema: assembly (rows, padding, per-device image tables), host merge, micro-batches, abstract shapes,
and the 8-device train step with images encoded where their rows live."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.trainer import image_step_script
from varft import batch as batch_lib
from varft import batch_placement, grpo
from varft.models.qwen25vl import model, vision

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = image_step_script.MODEL

LENGTH = 32


def _assemble(num_devices, rows=None, num_rows=None):
  all_rows, images = image_step_script.rows_and_images()
  rows = all_rows if rows is None else rows
  return batch_lib.assemble(rows, images, num_rows=num_rows or len(rows), num_samples=image_step_script.G,
                            num_devices=num_devices, length=LENGTH, vision_cfg=MODEL.vision,
                            patch_buckets=image_step_script.PATCH_BUCKETS,
                            max_image_patches=image_step_script.MAX_IMAGE_PATCHES)


def _row_image_embeds(params, batch):
  """Each row's image-token embeddings, looked up in its own device's table."""
  embeds = batch_lib.encode_tables(lambda pv, vi: model.encode_images(params, MODEL, pv, vi),
                                   jnp.asarray(batch["pixel_values"]), batch["vision_inputs"])
  rows = batch_lib.lookup_images(embeds, jnp.asarray(batch["image_index"]))
  return np.asarray(rows)[batch["image_index"] >= 0]


def test_padding_rows_are_empty_and_in_their_own_groups():
  rows, _ = image_step_script.rows_and_images()
  padded = _assemble(1, rows=rows[:4], num_rows=8)
  assert padded["tokens"].shape == (8, LENGTH) and padded["positions"].shape[:2] == (3, 8)
  with pytest.raises(ValueError, match="does not fit the length"):
    batch_lib.assemble(rows, {}, num_rows=16, num_samples=2, num_devices=1, length=8)
  np.testing.assert_array_equal(padded["group_ids"], [0, 0, 1, 1, 2, 2, 3, 3])
  assert padded["loss_mask"][4:].sum() == 0 and padded["attention_mask"][4:].sum() == 0
  assert np.all(padded["image_index"][4:] == -1)
  with pytest.raises(ValueError, match="multiple of the batch devices"):
    _assemble(3, rows=rows[:4], num_rows=8)


def test_each_device_holds_and_encodes_only_its_own_rows_images():
  params = model.init_params(jax.random.key(0), MODEL)
  one, eight = _assemble(1), _assemble(8)
  assert one["pixel_values"].shape == (1, 512, MODEL.vision.patch_dim)  # 8 images, each on its own 64-patch block
  # 2 rows (one prompt) per device; the largest image (64 patches) sets the bucket.
  assert eight["pixel_values"].shape == (8, 64, MODEL.vision.patch_dim)
  # Device d's table holds exactly prompt d's image, once.
  grids = eight["image_grid_thw"]
  for d, grid in enumerate(image_step_script.GRIDS):
    np.testing.assert_array_equal(grids[d, 0], grid)
  np.testing.assert_allclose(_row_image_embeds(params, eight), _row_image_embeds(params, one), atol=1e-5)
  # Each image on its own attention blocks: full attention visits one key block (these images fit one), and the
  # 8-image table gives every row what encoding its image alone gives.
  assert one["vision_inputs"]["full_key_blocks"].shape == (1, 8, 1)
  _, images = image_step_script.rows_and_images()
  alone = {
      k: np.asarray(model.encode_images(params, MODEL, im.patches, vision.vision_inputs(im.grid[None], MODEL.vision)))
      for k, im in images.items()
  }
  rows, _ = image_step_script.rows_and_images()
  expected = np.concatenate(
      [alone[k][i][None] for r in rows for k, i in zip(r.image_key, r.image_local) if k is not None])
  np.testing.assert_allclose(_row_image_embeds(params, one), expected, atol=1e-5)
  # Three prompts on two devices: prompt 1's rows straddle devices 0 and 1, so both hold its image.
  rows = image_step_script.rows_and_images()[0][:6]
  two = _assemble(2, rows=rows)
  assert [int((np.prod(g, axis=1) > 0).sum()) for g in two["image_grid_thw"]] == [2, 2]
  np.testing.assert_allclose(_row_image_embeds(params, two), _row_image_embeds(params, _assemble(1, rows=rows)),
                             atol=1e-5)


def test_tables_grown_to_agreed_shapes_give_the_same_embeddings():
  params = model.init_params(jax.random.key(0), MODEL)
  local = _assemble(8)
  grown = batch_placement.pad_to_shapes(local, 40, (256, 4, 3), 8, MODEL.vision)
  assert grown["tokens"].shape == (16, 40) and grown["pixel_values"].shape == (8, 256, MODEL.vision.patch_dim)
  assert grown["vision_inputs"]["full_key_blocks"].shape == (8, 4, 4) and grown["image_grid_thw"].shape == (8, 3, 3)
  assert np.all(grown["image_index"][:, LENGTH:] == -1)
  np.testing.assert_allclose(_row_image_embeds(params, grown), _row_image_embeds(params, local), atol=1e-5)
  text_only = {k: v for k, v in local.items() if k not in ("pixel_values", "vision_inputs", "image_grid_thw")}
  empty = batch_placement.pad_to_shapes(dict(text_only, image_index=np.full_like(local["image_index"], -1)), LENGTH,
                                        (64, 1, 1), 8, MODEL.vision)
  assert empty["pixel_values"].shape == (8, 64, MODEL.vision.patch_dim) and not empty["pixel_values"].any()


def test_micro_batches_must_divide_each_devices_rows():
  batch = jax.tree.map(jnp.asarray, _assemble(8))
  micro = batch_lib.split_micro(batch, 2)
  assert micro["tokens"].shape == (2, 8, LENGTH) and micro["positions"].shape[:3] == (2, 3, 8)
  np.testing.assert_array_equal(micro["tokens"][1], batch["tokens"][1::2])
  with pytest.raises(ValueError, match="rows per device must be a multiple of grpo.micro_batches"):
    batch_lib.split_micro(batch, 4)


def test_abstract_batch_matches_a_built_one():
  gcfg = grpo.GRPOConfig(beta=0.04, tis_cap=2.0)
  built = jax.tree.map(jnp.asarray, _assemble(8))
  logps = built["sampler_logps"]
  prepared = grpo.prepare_batch(built, jnp.zeros((16,)), logps, gcfg, ref_logps=logps, trainer_logps=logps)
  planned = batch_lib.abstract(16, LENGTH, num_devices=8, vision_cfg=MODEL.vision, patches_per_device=64,
                               max_image_patches=64, importance_weights=True)
  shape = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
  assert shape(planned) == shape(prepared)
  rollout = batch_lib.abstract(16, LENGTH, stage="rollout")
  assert set(rollout) == set(batch_lib.ROLLOUT_KEYS) | {"rewards"} and "pixel_values" not in rollout
  assembled = _assemble(8)
  assert {
      k: shape(rollout[k]) for k in batch_lib.ROLLOUT_KEYS
  } == {
      k: shape(assembled[k]) for k in batch_lib.ROLLOUT_KEYS
  }
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  sharded = batch_lib.abstract(16, 8, stage="rollout", mesh=mesh)
  assert sharded["positions"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))


def test_sharded_step_with_images_equals_single_device_and_holds_only_its_patches():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-m", "tests.trainer.image_step_script"], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
  assert float(lines["DIFF"]) <= 1e-5, out.stdout
  assert lines["TABLE"] == "(8, 64, 1176) P('fsdp',)", out.stdout
  shapes = lines["HLO"].split()
  assert "f32[1,64,1176]" in shapes, shapes  # this device's table
  # Nothing the size of the whole batch's patches (512) or of every device's tables (8 x 64) is on one device.
  assert not [s for s in shapes if "512" in s or s.split("[")[1].startswith("8,")], shapes


def test_two_hosts_with_different_buckets_take_the_single_device_step(tmp_path):
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = str(sock.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  one = tmp_path / "one.npz"
  subprocess.run([sys.executable, "-m", "tests.trainer.image_step_script",
                  str(one)], cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
  two = tmp_path / "two.npz"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"  # 2 hosts x 4 devices, fsdp = 8
  procs = [
      subprocess.Popen([sys.executable, "-m", "tests.trainer.image_step_script",
                        str(two), str(i), "2", port], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True) for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  a, b = np.load(one), np.load(two)
  assert sorted(a.files) == sorted(b.files)
  for key in a.files:
    np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)
