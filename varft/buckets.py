"""Static-shape buckets: the sizes a length, a count of prompts or a count of gathered rows is padded to, so that
few programs compile."""
from __future__ import annotations

from collections.abc import Sequence


def bucket(n: int, buckets: Sequence[int], beyond: str = "error") -> int:
  """The smallest bucket >= n. Past the largest bucket: an error, or (`beyond='multiple'`) the next multiple of it."""
  for b in sorted(buckets):
    if n <= b:
      return b
  if beyond == "multiple":
    return -(-n // max(buckets)) * max(buckets)
  raise ValueError(f"Length {n} exceeds the largest bucket {max(buckets)}; add a larger bucket to the config.")


def power_of_two_bucket(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= max(n, minimum): the bucket of sizes with no fixed list."""
  return 1 << (max(int(n), int(minimum), 1) - 1).bit_length()


def row_bucket(n: int, multiple: int = 1, minimum: int = 4) -> int:
  """The rows a gathered program over `n` rows runs on: `multiple` times the smallest power of two or 1.5 x power
  of two >= n / multiple (and >= `minimum`), so that the live rows fill at least 2/3 of it and few programs compile
  (4, 6, 8, 12, 16, 24, ...)."""
  per = max(-(-int(n) // multiple), minimum, 1)
  two = power_of_two_bucket(per)
  return multiple * (3 * two // 4 if two >= 4 and 3 * two // 4 >= per else two)
