"""Cache rows gathered and written back (`text.take_rows` / `put_rows`), in float32 and as bf16 bit patterns."""
import jax.numpy as jnp
import numpy as np
import pytest

from varft.models.qwen25vl import text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_taken_and_put_back_touch_only_those_rows(dtype):
  rng = np.random.default_rng(0)
  shape = (2, 5, 3, 1, 4)  # layers, rows, slots, kv heads, head dim
  cache = {
      "k": jnp.asarray(rng.normal(size=shape), dtype),
      "v": jnp.asarray(rng.normal(size=shape), dtype),
      "length": jnp.arange(5, dtype=jnp.int32)
  }
  rows = jnp.asarray([3, 1, 5], jnp.int32)  # 5: past the cache, a padding row
  taken = text.take_rows(cache, rows)
  np.testing.assert_array_equal(np.asarray(taken["k"][:, 0], np.float32), np.asarray(cache["k"][:, 3], np.float32))
  assert not np.asarray(taken["v"][:, 2], np.float32).any() and list(taken["length"]) == [3, 1, 0]
  new = {
      "k": jnp.full((2, 3, 3, 1, 4), 7, dtype),
      "v": jnp.full((2, 3, 3, 1, 4), -2, dtype),
      "length": jnp.asarray([9, 8, 6], jnp.int32)
  }
  out = text.put_rows(cache, rows, new)
  want_k = np.asarray(cache["k"], np.float32).copy()
  want_k[:, [3, 1]] = 7
  np.testing.assert_array_equal(np.asarray(out["k"], np.float32), want_k)
  assert out["k"].dtype == dtype and list(out["length"]) == [0, 8, 2, 9, 4]
  assert (np.asarray(out["v"][:, 1], np.float32) == -2).all() and (np.asarray(out["v"][:, 0]) == cache["v"][:, 0]).all()
