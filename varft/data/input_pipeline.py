"""grain input pipeline: shuffled, per-host sharded batches of example dicts, resumable.

Examples stay Python dicts on the host (the rollout tokenizes prompts and processes images), so a
batch is a `list[dict]`, not stacked arrays.

Order of operations (all lazy, random access, on a grain `MapDataset`):
  source -> shuffle(seed)        one global permutation per epoch (reseeded each epoch)
         -> [host::hosts]        per-host shard of each epoch; every host gets the same count
         -> repeat(num_epochs)   None = forever
         -> batch(batch_size)    lists of dicts; batches run across epoch boundaries

With `balance_by` (a record field, e.g. `step_type`), each host's shard of an epoch is put in a stratified order
(`balanced_order`): every run of consecutive examples, so every batch, holds each value of the field in about its
share of the data, instead of whatever mix a shuffle deals (a GRPO step's mean reward then does not swing with which
kinds of prompt came up). The field is read from every record once, when the pipeline is built.

Position: `iterator.get_state()` is `{'epoch': e, 'index': i}` (examples of this host's shard
consumed in the current epoch). Saving it with a checkpoint and passing it back through
`set_state` (or `batches(..., state=...)`) yields exactly the remaining sequence.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import grain
import numpy as np


def host_shard() -> tuple[int, int]:
  """(process index, process count) from JAX; (0, 1) on a single host."""
  import jax
  return jax.process_index(), jax.process_count()


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """What defines the sequence; a restored state is only valid for the same spec."""
  batch_size: int
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = True
  shard_index: int = 0
  shard_count: int = 1
  balance_by: str = ''  # a record field each batch holds in proportion ('' = a plain shuffle)


def balanced_order(keys: Sequence[Any], rng: np.random.Generator) -> np.ndarray:
  """A random permutation of range(len(keys)) in which every run of consecutive positions holds each key in about
  its share: each key's items, shuffled, are spread at even intervals with a random phase, and the spreads merged
  (systematic stratified sampling; ties broken at random)."""
  keys = np.asarray([str(k) for k in keys])
  position = np.empty(len(keys))
  for key in np.unique(keys):
    members = rng.permutation(np.flatnonzero(keys == key))
    position[members] = (np.arange(len(members)) + rng.random()) / len(members)
  return np.lexsort((rng.random(len(keys)), position))


def _balanced(source: Sequence[Any], spec: PipelineSpec, per_host: int) -> grain.MapDataset:
  """This host's examples, each epoch shuffled, sharded and put in `balanced_order` of `spec.balance_by`."""
  n = len(source)
  values = [source[i].get(spec.balance_by) for i in range(n)]
  if all(v is None for v in values):
    raise ValueError(f"balance_by={spec.balance_by!r}: no record has this field; name one of the records' fields "
                     "(e.g. step_type) or '' for a plain shuffle")
  keys = np.asarray([str(v) for v in values])

  @functools.lru_cache(maxsize=2)
  def epoch_order(epoch: int) -> np.ndarray:
    rng = np.random.default_rng([spec.seed, epoch, spec.shard_index])
    shuffled = np.random.default_rng([spec.seed, epoch]).permutation(n) if spec.shuffle else np.arange(n)
    mine = shuffled[:per_host * spec.shard_count][spec.shard_index::spec.shard_count]
    return mine[balanced_order(keys[mine], rng)]

  ds = grain.MapDataset.range(per_host)
  if spec.num_epochs != 1:
    ds = ds.repeat(spec.num_epochs)
  return ds.map_with_index(lambda i, _: source[int(epoch_order(i // per_host)[i % per_host])])


def _dataset(source: Sequence[Any], spec: PipelineSpec,
             transform: Callable[[dict], dict] | None) -> tuple[grain.MapDataset, int]:
  n = len(source)
  # Equal shard sizes keep hosts in lockstep (the same number of steps per epoch on each).
  per_host = n // spec.shard_count
  if per_host == 0:
    raise ValueError(f'dataset of {n} examples cannot be split over {spec.shard_count} hosts')
  if spec.batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {spec.batch_size}')
  if spec.balance_by:
    ds = _balanced(source, spec, per_host)
  else:
    ds = grain.MapDataset.source(source)
    if spec.shuffle:
      ds = ds.shuffle(seed=spec.seed)
    ds = ds.slice(slice(spec.shard_index, per_host * spec.shard_count, spec.shard_count))
    if spec.num_epochs != 1:
      ds = ds.repeat(spec.num_epochs)
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(spec.batch_size, drop_remainder=spec.drop_remainder, batch_fn=list)
  return ds, per_host


class Batches:
  """Iterator over `list[dict]` batches with an (epoch, index) position."""

  def __init__(self, source: Sequence[Any], spec: PipelineSpec, transform: Callable[[dict], dict] | None = None,
               read_options: grain.ReadOptions | None = None):
    self.spec = spec
    self._dataset, self.examples_per_epoch = _dataset(source, spec, transform)
    self._iter = iter(
        self._dataset.to_iter_dataset(read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

  def __iter__(self):
    return self

  def __next__(self) -> list[dict]:
    return next(self._iter)

  def __len__(self) -> int:
    """Batches in the whole sequence (infinite sequences raise)."""
    if self.spec.num_epochs is None:
      raise TypeError('an endless pipeline (num_epochs=None) has no length')
    return len(self._dataset)

  def get_state(self) -> dict:
    """{'epoch': int, 'index': int}: examples consumed so far, as a position in the epochs."""
    consumed = self._iter.get_state()['next_index'] * self.spec.batch_size
    epoch, index = divmod(consumed, self.examples_per_epoch)
    return {'epoch': int(epoch), 'index': int(index)}

  def set_state(self, state: dict) -> None:
    """Moves to a position from `get_state` (e.g. restored from a checkpoint)."""
    consumed = int(state['epoch']) * self.examples_per_epoch + int(state['index'])
    next_batch, rest = divmod(consumed, self.spec.batch_size)
    if rest:
      raise ValueError(f'state {state} is not on a batch boundary for batch_size='
                       f'{self.spec.batch_size} ({self.examples_per_epoch} examples per epoch); '
                       'resume with the batch size the state was saved with')
    self._iter.set_state({'next_index': next_batch})


def batches(source: Sequence[Any], *, batch_size: int, seed: int = 0, shuffle: bool = True,
            num_epochs: int | None = None, drop_remainder: bool = True, shard: tuple[int, int] | None = None,
            state: dict | None = None, transform: Callable[[dict], dict] | None = None,
            balance_by: str = '') -> Batches:
  """Batches of example dicts from a random-access `source` (e.g. `varft.data.load(...)`).

  `batch_size` is per host. `shard` defaults to this JAX process's (index, count). Training uses
  `num_epochs=None` (forever); evaluation uses `shuffle=False, num_epochs=1,
  drop_remainder=False`. `state` resumes from a saved `get_state()`. `balance_by`: a record field every batch holds
  in about its share of the data (see the module doc).
  """
  shard_index, shard_count = shard if shard is not None else host_shard()
  spec = PipelineSpec(batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                      drop_remainder=drop_remainder, shard_index=shard_index, shard_count=shard_count,
                      balance_by=balance_by)
  it = Batches(source, spec, transform)
  if state is not None:
    it.set_state(state)
  return it
