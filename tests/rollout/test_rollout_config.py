"""The engine's RolloutConfig and the run config (`varft.defaults`) have one default per setting."""
import dataclasses

from varft import defaults, rollout_config


def test_every_engine_default_is_the_run_configs():
  run = defaults.base_config().rollout
  differing = {}
  for field in dataclasses.fields(rollout_config.RolloutConfig):
    if field.name in run:
      value = tuple(run[field.name]) if isinstance(run[field.name], (list, tuple)) else run[field.name]
      if field.default != value:
        differing[field.name] = (field.default, value)
  assert not differing, differing
  assert rollout_config.RolloutConfig().mode == "stepwise"  # the paper's training
