"""Reading an optimized (per-device) HLO text: its largest values and its all-gathers (`varft.plan` names them when
a program does not fit, and tests check the collectives of a compiled step)."""
from __future__ import annotations

import re

import numpy as np

_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8
}


def _shapes(text: str) -> list[tuple[int, str]]:
  out = []
  for dtype, dims in _SHAPE.findall(text):
    size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    out.append((size * _ITEMSIZE[dtype], f"{dtype}[{dims}]"))
  return out


def _split_type(rhs: str) -> tuple[str, str]:
  """(result type, the rest) of the right-hand side of an HLO instruction; tuple types nest parentheses."""
  if not rhs.startswith("("):
    kind, _, rest = rhs.partition(" ")
    return kind, rest
  depth = 0
  for i, ch in enumerate(rhs):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return rhs[:i + 1], rhs[i + 1:].lstrip()
  return rhs, ""


def hlo_buffers(hlo: str, top: int = 5) -> tuple[list[dict], list[dict]]:
  """(largest values, all-gathers) of an optimized (per-device) HLO text: [{bytes, shape, op}], largest first."""
  largest, gathers = {}, {}
  for line in hlo.splitlines():
    _, sep, rhs = line.partition(" = ")
    if not sep:
      continue
    kind, rest = _split_type(rhs.strip())
    op = rest.split("(", 1)[0]
    results = _shapes(kind)
    if not results or op in ("parameter", "tuple", "get-tuple-element", "bitcast"):
      continue
    size, shape = max(results)
    entry = {"bytes": size, "shape": shape, "op": op}
    largest.setdefault((shape, op), entry)
    if op.startswith("all-gather"):
      gathers.setdefault((shape, op), entry)
  order = lambda d: sorted(d.values(), key=lambda e: -e["bytes"])
  return order(largest)[:top], order(gathers)
