"""MAT-Training keeps each record's `gt` (the reference step with its <think>), which gold injection scores."""
from varft.data import builders


def test_mat_training_keeps_the_records_gt(mat_dir, tmp_path):
  src = builders.load('mat_training/coding', manual_dir=mat_dir, data_dir=str(tmp_path / 'tfds'))
  steps = [src[i] for i in range(len(src))]
  assert steps[0]['gt'] == "<think> Too dark. </think>\n<problem> {'dark'} </problem>"
  assert steps[1]['gt'].startswith('<think> Brighten. </think>\n<code>')
  assert steps[2]['gt'] == '<think> It reads OPEN. </think>\n<answer> OPEN </answer>'
  assert steps[3]['gt'] == ''  # the record has no gt
