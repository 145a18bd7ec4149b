"""Answer normalisation shared by the rewards and the benchmark scoring.

These are the rules of the Visual-ARFT training rewards and evaluation scripts (SQuAD-style):
lowercase, drop ASCII punctuation, drop the articles a/an/the, fold whitespace. MAT-Coding's
scoring also drops CJK punctuation and compares text with CJK characters per character.
"""
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Full-width and CJK punctuation removed by the MAT-Coding scoring script.
CJK_PUNCTUATION = "！？｡＂＃＄％＆＇（）＊＋，－．／：；＜＝＞＠［＼］＾＿｀｛｜｝～“”‘’、。：《》【】"
# str.translate tables that delete the punctuation characters.
_DROP_ASCII_PUNCT = str.maketrans("", "", string.punctuation)
_DROP_ASCII_AND_CJK_PUNCT = str.maketrans("", "", string.punctuation + CJK_PUNCTUATION)


def has_cjk(text: str) -> bool:
  """True when `text` holds a CJK unified ideograph (U+4E00..U+9FFF)."""
  return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def normalize_answer(text: str, *, cjk: bool = False) -> str:
  """SQuAD-style normalisation; `cjk=True` gives the MAT-Coding variant.

  The MAT-Coding variant also strips CJK punctuation and, when the text holds CJK characters,
  removes every space and keeps articles (the text is then compared per character).
  """
  text = text.lower().translate(_DROP_ASCII_AND_CJK_PUNCT if cjk else _DROP_ASCII_PUNCT)
  if cjk and has_cjk(text):
    return text.replace(" ", "")
  return " ".join(_ARTICLES.sub(" ", text).split())


def answer_tokens(text: str) -> list[str]:
  """Word tokens of a normalised answer, as the paper's training rewards split it."""
  return normalize_answer(text).split()
