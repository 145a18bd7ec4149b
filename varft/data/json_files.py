"""Reading the published JSON and JSONL files: BOMs accepted, positions kept for messages.

A JSON list file is read record by record (`read_json_list`), so that a skip message names the
file and the line a record starts on, and text that is not UTF-8 rejects only the records that
hold it. JSONL files (`iter_jsonl`) skip and count lines that are not UTF-8 or not JSON. A file
that is not a JSON list at all, or nests deeper than Python can parse, is one error line naming
the file and line.
"""
from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import json
import os
import re
from typing import Any

from varft.data import records

_BOM = b'\xef\xbb\xbf'
_JSON_SPACE = re.compile(r'[ \t\n\r]*')


@dataclasses.dataclass(frozen=True)
class JsonRecords:
  """The records of a JSON list file and the line each one starts on."""
  path: str
  records: list
  lines: list

  def where(self, index: int) -> str:
    """`'MAT-Search.json:12 (item 3)'`: what a skip message names."""
    return f'{os.path.basename(self.path)}:{self.lines[index]} (item {index})'


def read_json_list(path: str) -> JsonRecords:
  """Reads a JSON file holding a list of records (a UTF-8 BOM is accepted).

  A file that is not a JSON list is an error naming the file and line; text that is not UTF-8
  only rejects the records whose fields hold it (decoded with `surrogateescape`, a field holding
  such text is rejected when `varft.data.records` reads it).
  """
  with open(path, 'rb') as f:
    text = f.read().removeprefix(_BOM).decode('utf-8', 'surrogateescape')
  decoder = json.JSONDecoder()
  values, starts = [], []
  index = _JSON_SPACE.match(text).end()
  try:
    if text[index:index + 1] != '[':
      data = json.loads(text)  # not a list: raises for broken JSON, else reports the type below
      raise ValueError(f'{path} must hold a JSON list of records, got {type(data).__name__}.')
    index = _JSON_SPACE.match(text, index + 1).end()
    while text[index:index + 1] != ']':
      if values:
        if text[index:index + 1] != ',':
          raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = _JSON_SPACE.match(text, index + 1).end()
      starts.append(index)
      value, index = decoder.raw_decode(text, index)
      values.append(value)
      index = _JSON_SPACE.match(text, index).end()
    index = _JSON_SPACE.match(text, index + 1).end()
    if index < len(text):
      raise json.JSONDecodeError('Extra data', text, index)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); re-download it.') from None
  except RecursionError:
    line = text.count('\n', 0, starts[-1]) + 1 if starts else 1
    raise ValueError(f'{path}:{line}: item {len(values)} is nested too deeply to parse; fix or remove '
                     'it.') from None
  lines, line, last = [], 1, 0
  for start in starts:
    line += text.count('\n', last, start)
    lines.append(line)
    last = start
  return JsonRecords(path, values, lines)


def iter_jsonl(path: str, report: records.SkipReport) -> Iterator[tuple[int, Any]]:
  """Yields (line number, parsed object) from a JSONL file (a UTF-8 BOM is accepted), skipping
  and counting lines that are not UTF-8 or not JSON."""
  name = os.path.basename(path)
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = (raw.removeprefix(_BOM) if line_no == 1 else raw).decode('utf-8')
      except UnicodeDecodeError as e:
        report.skip(f'{name}:{line_no}', records.MalformedRecord('invalid utf-8', str(e)))
        continue
      if not line.strip():
        continue
      try:
        yield line_no, json.loads(line)
      except json.JSONDecodeError as e:
        report.skip(f'{name}:{line_no}', records.MalformedRecord('bad json line', str(e)))
      except RecursionError:
        report.skip(f'{name}:{line_no}', records.MalformedRecord('bad json line', 'nested too deeply to parse'))
