"""grain pipeline: shuffling, host sharding, batching of dicts, exact resume."""
import pytest

from varft.data import input_pipeline


def _source(n):
  return [{'id': str(i), 'images': [bytes([i])]} for i in range(n)]


def _ids(batch):
  return [e['id'] for e in batch]


def test_epochs_are_permutations_reshuffled_each_epoch():
  it = input_pipeline.batches(_source(12), batch_size=4, seed=3, shard=(0, 1))
  epochs = [sum((_ids(next(it)) for _ in range(3)), []) for _ in range(2)]
  assert sorted(epochs[0], key=int) == [str(i) for i in range(12)]
  assert sorted(epochs[1], key=int) == [str(i) for i in range(12)]
  assert epochs[0] != [str(i) for i in range(12)] and epochs[0] != epochs[1]
  again = input_pipeline.batches(_source(12), batch_size=4, seed=3, shard=(0, 1))
  assert _ids(next(again)) == epochs[0][:4]
  other_seed = input_pipeline.batches(_source(12), batch_size=12, seed=4, shard=(0, 1))
  assert _ids(next(other_seed)) != epochs[0]


def test_hosts_get_disjoint_equal_shards():
  shards = []
  for host in range(3):
    it = input_pipeline.batches(_source(11), batch_size=3, seed=0, shard=(host, 3))
    assert it.examples_per_epoch == 3  # 11 // 3: hosts stay in lockstep
    shards.append(_ids(next(it)))
  flat = sum(shards, [])
  assert len(set(flat)) == 9


def test_resume_gives_the_same_remaining_sequence():

  def run(state=None, steps=7):
    it = input_pipeline.batches(_source(10), batch_size=3, seed=5, shard=(1, 2), state=state)
    return it, [_ids(next(it)) for _ in range(steps)]

  _, full = run(steps=9)
  it, head = run(steps=4)
  state = it.get_state()
  assert state == {'epoch': 2, 'index': 2}  # 12 of 5-per-epoch examples consumed
  _, tail = run(state=state, steps=5)
  assert head + tail == full


def test_state_must_sit_on_a_batch_boundary():
  it = input_pipeline.batches(_source(10), batch_size=4, shard=(0, 1))
  with pytest.raises(ValueError, match='batch boundary'):
    it.set_state({'epoch': 0, 'index': 3})


def test_eval_pass_keeps_order_and_last_partial_batch():
  it = input_pipeline.batches(_source(7), batch_size=3, shuffle=False, num_epochs=1, drop_remainder=False, shard=(0, 1))
  assert len(it) == 3
  assert [_ids(b) for b in it] == [['0', '1', '2'], ['3', '4', '5'], ['6']]


def test_transform_runs_per_example_and_batches_stay_dicts():
  it = input_pipeline.batches(_source(4), batch_size=2, shuffle=False, shard=(0, 1), transform=lambda e: {
      **e, 'n': int(e['id']) * 10
  })
  batch = next(it)
  assert isinstance(batch, list) and batch[1] == {'id': '1', 'images': [b'\x01'], 'n': 10}


def test_too_many_hosts_is_an_error():
  with pytest.raises(ValueError, match='cannot be split over 4 hosts'):
    input_pipeline.batches(_source(3), batch_size=1, shard=(0, 4))


def test_default_shard_comes_from_jax():
  assert input_pipeline.host_shard() == (0, 1)


# ---- balance_by: every batch holds each kind in its share ---------------------------------------------------------


def _typed(n):
  """Half answer steps, a quarter each problem and code steps."""
  kinds = ['answer', 'answer', 'problem', 'code']
  return [{'id': str(i), 'step_type': kinds[i % 4]} for i in range(n)]


def _mix_error(it, batches, batch_size):
  """The largest gap over `batches` batches between a kind's count in a batch and its share of the batch."""
  worst = 0.0
  for _ in range(batches):
    kinds = [e['step_type'] for e in next(it)]
    for kind, share in (('answer', 0.5), ('problem', 0.25), ('code', 0.25)):
      worst = max(worst, abs(kinds.count(kind) - share * batch_size))
  return worst


def test_balanced_batches_hold_each_kind_in_its_share():
  balanced = input_pipeline.batches(_typed(64), batch_size=8, seed=0, shard=(0, 1), balance_by='step_type')
  assert _mix_error(balanced, 24, 8) <= 1  # three epochs: every batch 4 +- 1 answers, 2 +- 1 of the others
  shuffled = input_pipeline.batches(_typed(64), batch_size=8, seed=0, shard=(0, 1))
  assert _mix_error(shuffled, 24, 8) >= 2  # a shuffle deals some batches far off the mix


def test_balanced_epochs_split_the_data_between_hosts_and_are_reshuffled():
  epochs = []  # epochs[host][epoch]: the ids that host saw in that epoch
  for host in range(2):
    it = input_pipeline.batches(_typed(40), batch_size=4, seed=1, shard=(host, 2), balance_by='step_type')
    epochs.append([sum((_ids(next(it)) for _ in range(5)), []) for _ in range(2)])
  for epoch in range(2):
    assert len(set(epochs[0][epoch])) == len(set(epochs[1][epoch])) == 20
    assert set(epochs[0][epoch]) | set(epochs[1][epoch]) == {str(i) for i in range(40)}
  assert epochs[0][0] != epochs[0][1]


def test_balanced_resume_gives_the_same_remaining_sequence():

  def run(state=None, steps=9):
    it = input_pipeline.batches(_typed(24), batch_size=4, seed=2, shard=(0, 1), state=state, balance_by='step_type')
    return [_ids(next(it)) for _ in range(steps)], it.get_state()

  whole, _ = run()
  first, state = run(steps=4)
  rest, _ = run(state=state, steps=5)
  assert first + rest == whole


def test_balance_by_a_field_no_record_has_is_an_error():
  with pytest.raises(ValueError, match="balance_by='kind'"):
    input_pipeline.batches(_typed(8), batch_size=4, shard=(0, 1), balance_by='kind')
