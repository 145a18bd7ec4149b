"""Record parsing details the builder tests do not reach."""
import io
import json

from PIL import Image
import pytest

from varft.data import json_files, records


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
  raw = {
      'id': b'7',
      'task': b'search',
      'question': b'q',
      'answers': [b'a', b'\xc3\xa9'],
      'images': [b'\x89PNG'],
      'degradations': [],
      'split': b'hard'
  }
  assert records.decode(raw) == {
      'id': '7',
      'task': 'search',
      'question': 'q',
      'answers': ['a', 'é'],
      'images': [b'\x89PNG'],
      'degradations': [],
      'split': 'hard'
  }


def test_read_json_list_accepts_a_bom_and_knows_each_records_line(tmp_path):
  path = tmp_path / 'MAT-Search.json'
  rows = [{'id': 1, 'question': 'a?'}, {'id': 2, 'question': 'b?'}, {'id': 3, 'question': 'c?'}]
  path.write_bytes(b'\xef\xbb\xbf' + json.dumps(rows, indent=1).encode())
  read = json_files.read_json_list(str(path))
  assert read.records == rows  # the BOM neither rejects the file nor eats the first record
  assert read.lines == [2, 6, 10] and read.where(1) == 'MAT-Search.json:6 (item 1)'
  path.write_bytes(b'[]')
  assert json_files.read_json_list(str(path)).records == []


@pytest.mark.parametrize('text, message', [
    ('[{"id": 1},\n {"id": 2]', r"x\.json is not valid JSON \(Expecting ',' delimiter: line 2 column 10"),
    ('[{"id": 1}\n {"id": 2}]', r"Expecting ',' delimiter: line 2 column 2"),
    ('[{"id": 1}] [', r'Extra data: line 1 column 13'),
    ('[{"id": 1},', r'Expecting value: line 1 column 12'),
    ('{"id": 1}', r'must hold a JSON list of records, got dict'),
])
def test_read_json_list_names_file_and_line_of_broken_json(tmp_path, text, message):
  path = tmp_path / 'x.json'
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    json_files.read_json_list(str(path))


def test_read_json_list_rejects_5000_deep_json_in_one_line_without_recursion_error(tmp_path):
  path = tmp_path / 'deep.json'
  path.write_text('[{"id": 1},\n' + '[' * 5000 + ']' * 5000 + ']')
  with pytest.raises(ValueError) as info:
    json_files.read_json_list(str(path))
  assert info.value.__suppress_context__  # no RecursionError traceback under the message
  assert str(info.value) == f'{path}:2: item 1 is nested too deeply to parse; fix or remove it.'


def test_fields_holding_text_that_is_not_utf8_reject_only_their_record(tmp_path):
  path = tmp_path / 'x.json'
  path.write_bytes(b'[{"question": "caf\xe9?", "answer": "a"},\n {"question": "ok?", "answer": "b\xff"},\n'
                   b' {"question": "fine?", "answer": "c", "note": "\xff ignored: not read"}]')
  rows = json_files.read_json_list(str(path)).records
  for record in rows[:2]:
    with pytest.raises(records.MalformedRecord) as info:
      records.mat_search_example(record, 0, 3, str(tmp_path))
    assert info.value.reason == 'invalid utf-8'
  with pytest.raises(records.MalformedRecord, match='bad image_path'):  # past the text checks
    records.mat_search_example(rows[2], 2, 3, str(tmp_path))


def test_iter_jsonl_accepts_a_bom_and_skips_lines_that_are_not_utf8_or_too_deep(tmp_path):
  path = tmp_path / 'dev.jsonl'
  path.write_bytes(b'\xef\xbb\xbf{"id": "a"}\n{"id": "\xff"}\n' + b'[' * 5000 + b']' * 5000 + b'\n{"id": "b"}\n')
  report = records.SkipReport('dev')
  assert list(json_files.iter_jsonl(str(path), report)) == [(1, {'id': 'a'}), (4, {'id': 'b'})]
  assert report.counts == {'invalid utf-8': 1, 'bad json line': 1}
  assert report.first[0].startswith('dev.jsonl:2: invalid utf-8')
  assert report.first[1] == 'dev.jsonl:3: bad json line: nested too deeply to parse'


def test_read_image_rejects_sizes_the_image_processor_rejects(tmp_path):
  wide, limit = tmp_path / 'wide.png', tmp_path / 'limit.png'
  Image.new('RGB', (60000, 10)).save(wide)
  Image.new('RGB', (2000, 10)).save(limit)  # aspect ratio 200: the processor's limit, still accepted
  with pytest.raises(records.MalformedRecord, match='aspect ratio 6000.0 > 200') as info:
    records.read_image(str(wide))
  assert info.value.reason == 'bad image size'
  assert records.read_image(str(limit)) == limit.read_bytes()


def test_read_image_reencodes_a_float_tiff_scaled_not_clipped(tmp_path):
  import numpy as np
  path = tmp_path / 'depth.tiff'
  values = np.linspace(0, 1, 32 * 8, dtype=np.float32).reshape(8, 32)
  Image.fromarray(values).save(path)
  with Image.open(io.BytesIO(records.read_image(str(path)))) as image:
    assert image.format == 'PNG' and image.mode == 'RGB'
    got = np.asarray(image)[..., 0].astype(int)
  np.testing.assert_array_equal(got, np.round(values * 255).astype(int))
