"""Record parsing details the builder tests do not reach."""
import io

import pytest
from PIL import Image

from varft.data import records


def test_read_image_keeps_png_jpeg_bytes_and_reencodes_other_formats(tmp_path):
  png = tmp_path / 'a.png'
  Image.new('RGB', (8, 6), (1, 2, 3)).save(png)
  assert records.read_image(str(png)) == png.read_bytes()
  bmp = tmp_path / 'a.bmp'
  Image.new('RGB', (8, 6), (1, 2, 3)).save(bmp)
  data = records.read_image(str(bmp))
  with Image.open(io.BytesIO(data)) as image:
    assert image.format == 'PNG' and image.size == (8, 6)
    assert image.getpixel((0, 0)) == (1, 2, 3)


def test_read_image_rejects_truncated_file(tmp_path):
  good = io.BytesIO()
  Image.new('RGB', (64, 64), (9, 9, 9)).save(good, format='JPEG')
  path = tmp_path / 'cut.jpg'
  path.write_bytes(good.getvalue()[:100])
  with pytest.raises(records.MalformedRecord) as info:
    records.read_image(str(path))
  assert info.value.reason == 'corrupt image'


def test_resolve_image_falls_back_to_file_name(tmp_path):
  (tmp_path / 'x.png').write_bytes(b'')
  assert records.resolve_image(str(tmp_path), '/cluster/share/MAT/x.png') == str(tmp_path / 'x.png')
  with pytest.raises(records.MalformedRecord, match='missing image'):
    records.resolve_image(str(tmp_path), 'y.png')


def test_parse_degradations():
  assert records.parse_degradations(" {'rotation90', 'dark'} ") == ['rotation90', 'dark']
  assert records.parse_degradations('none') == ['none']
  with pytest.raises(records.MalformedRecord):
    records.parse_degradations("{'sepia'}")
  with pytest.raises(records.MalformedRecord):
    records.parse_degradations('')


def test_strip_query_and_step_type():
  assert records.strip_query('<query> Q? </query>\n<think> t </think>') == ('Q?', '<think> t </think>')
  assert records.strip_query('plain question') == ('plain question', '')
  assert records.step_type({'solution': '<think> x </think><search> q </search>'}) == 'search'
  assert records.step_type({'type': 'pre_code', 'solution': '<code> c </code>'}) == 'code'
  with pytest.raises(records.MalformedRecord, match='exactly one'):
    records.step_type({'solution': '<search> q </search><answer> a </answer>'})


def test_skip_report_summary_counts_reasons():
  report = records.SkipReport('src', max_messages=1)
  report.skip('row 1', records.MalformedRecord('bad type', 'x'))
  report.skip('row 2', records.MalformedRecord('bad type', 'y'))
  assert report.as_dict() == {'total': 2, 'reasons': {'bad type': 2}, 'first': ['row 1: bad type: x']}
  assert 'skipped 2 record(s) (2 bad type)' in report.summary()


def test_decode_turns_stored_bytes_into_str():
  raw = {'id': b'7', 'task': b'search', 'question': 'q'.encode(), 'answers': [b'a', b'\xc3\xa9'],
         'images': [b'\x89PNG'], 'degradations': [], 'split': b'hard'}
  assert records.decode(raw) == {'id': '7', 'task': 'search', 'question': 'q', 'answers': ['a', 'é'],
                                 'images': [b'\x89PNG'], 'degradations': [], 'split': 'hard'}
