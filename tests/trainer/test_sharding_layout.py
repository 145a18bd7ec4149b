"""Parameter layouts from the axes the model declares beside `init_params`, and the rules from the config.

`sharding_specs_before.json` holds the PartitionSpecs that the path-suffix table of sharding.py gave every
parameter, AdamW moment and sampling weight (tiny, 3b, 7b, on fsdp, data x fsdp x tensor and rollout meshes) before
the axes moved next to the model; the declared axes must reproduce them exactly.
"""
import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import pytest

from varft import defaults, grpo, rollout_sharding, sharding
from varft.models.qwen25vl import config as config_lib
from varft.models.qwen25vl import model, text, vision

BEFORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_specs_before.json")
MESHES = {"fsdp8": dict(fsdp=8), "d2f2t2": dict(data=2, fsdp=2, tensor=2), "f4t2": dict(fsdp=4, tensor=2)}


class _MeshShape:
  """Only what `spec_for` reads from a mesh: its axis sizes (no devices needed)."""

  def __init__(self, **shape):
    self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def _flat(specs):
  return {
      jax.tree_util.keystr(path): str(spec)
      for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  }


def _params(name):
  cfg = config_lib.get_config(name)
  return jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))


@pytest.mark.parametrize("name", ["tiny", "3b", "7b"])
def test_declared_axes_reproduce_the_path_table_specs(name):
  before = json.load(open(BEFORE))
  params = _params(name)
  optimizer, _ = grpo.make_optimizer(1e-3, 10)
  state = jax.eval_shape(lambda p: grpo.init_train_state(p, optimizer), params)
  for mesh_name, shape in MESHES.items():
    assert _flat(sharding.tree_specs(state, _MeshShape(**shape))) == before[f"{name}/state/{mesh_name}"], mesh_name
  rollout = _MeshShape(data=4, tensor=2)
  assert _flat(sharding.tree_specs(params, rollout,
                                   rollout_sharding.sampling_rules())) == before[f"{name}/sampling/rollout_t2"]
  assert [list(x) if x else None for x in rollout_sharding.transit_pieces(params)] == before[f"{name}/transit"]


def test_text_only_params_keep_their_layout():
  tiny = config_lib.get_config("tiny")
  params = jax.eval_shape(lambda: {"text": text.init_params(jax.random.key(0), tiny.text)})
  assert _flat(sharding.tree_specs(params, _MeshShape(fsdp=8))) == json.load(open(BEFORE))["tiny_text_only/state/fsdp8"]


@pytest.mark.parametrize("name", ["tiny", "3b", "7b"])
def test_every_created_parameter_has_declared_axes_of_its_rank(name):
  params = _params(name)
  declared = jax.tree_util.tree_leaves_with_path(model.PARAM_AXES, is_leaf=lambda x: isinstance(x, tuple))
  created = {jax.tree_util.keystr(p): leaf.ndim for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  declared = {jax.tree_util.keystr(p): len(axes) for p, axes in declared}
  tied = config_lib.get_config(name).text.tie_word_embeddings
  assert set(declared) - set(created) == ({"['text']['lm_head']"} if tied else set())
  assert {k: declared[k] for k in created} == created


def test_axes_follow_the_model_not_a_table():
  # A tree shaped like the model's, but under a key the model does not declare, is not a parameter: replicated.
  shapes = {"other": {"layers": {"q": {"w": jax.ShapeDtypeStruct((2, 8, 8), jnp.float32)}}}}
  assert sharding.tree_specs(shapes, _MeshShape(fsdp=8))["other"]["layers"]["q"]["w"] == P(None, None, None)
  assert vision.PARAM_AXES["blocks"]["qkv"]["w"] == ("layers", "embed", "heads")
  assert sharding.logical_axes(("opt_state", "mu", "vision", "blocks", "qkv", "w"), 3) == ("layers", "embed", "heads")


def test_config_rules_are_the_defaults_and_drive_every_resolution():
  config = defaults.base_config()
  assert sharding.rules_from_config(config.sharding.rules) == sharding.DEFAULT_RULES
  mesh = _MeshShape(fsdp=4, tensor=2)
  embed = _params("tiny")["text"]["embed"]
  assert sharding.spec_for(("vocab", "embed"), embed.shape, mesh) == P("tensor", "fsdp")
  config.sharding.rules.embed = ()
  config.sharding.rules.vocab = ("fsdp", "tensor")
  with sharding.axis_rules(config.sharding.rules):
    assert sharding.tree_specs({"text": {"embed": embed}}, mesh)["text"]["embed"] == P(("fsdp", "tensor"), None)
    abstract = jax.sharding.AbstractMesh((1, 4, 2), sharding.MESH_AXES)
    with jax.sharding.use_abstract_mesh(abstract):  # activations traced inside the context take its rules too
      jaxpr = jax.make_jaxpr(lambda x: sharding.constrain(x, ("act_embed", "vocab")))(jnp.zeros((4, 8)))
    assert "spec=P(None, ('fsdp', 'tensor'))" in str(jaxpr)
  assert sharding.current_rules() == sharding.DEFAULT_RULES


def test_rules_naming_an_unknown_mesh_axis_fail_in_one_line():
  with pytest.raises(ValueError, match=r"sharding.rules.embed='model': \['model'\] are not mesh axes"):
    sharding.rules_from_config({"embed": "model"})


def test_layout_table_lists_every_parameter_with_its_spec():
  params = _params("tiny")
  table = sharding.layout_table(params, _MeshShape(fsdp=4, tensor=2))
  lines = table.splitlines()
  assert len(lines) == len(jax.tree.leaves(params))
  embed = next(line for line in lines if line.startswith("text/embed "))
  assert "('vocab', 'embed')" in embed and embed.endswith("P('tensor', 'fsdp')")
  assert any(line.startswith("vision/blocks/norm1 ") and line.endswith("P(None, None)") for line in lines)
