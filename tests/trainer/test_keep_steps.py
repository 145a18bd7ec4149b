"""Checkpoints of named steps (the paper evaluates step 200 / 1400) survive keep-N."""
import jax.numpy as jnp

from experiments import coding, search
from varft import checkpoint as ckpt_lib


def test_named_steps_are_kept_beyond_the_latest_n(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False, keep_steps=(2,))
  for step in range(1, 7):
    ckpt.save(step, {"w": jnp.full((2,), float(step))})
  ckpt.wait()
  assert sorted(ckpt._manager.all_steps()) == [2, 5, 6]
  ckpt.close()


def test_paper_recipes_keep_the_reported_steps():
  assert search.get_config("7b").keep_checkpoint_steps == (200,)
  assert coding.get_config("3b").keep_checkpoint_steps == (1400,)
