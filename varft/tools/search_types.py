"""The types every search backend shares: a document, the error a failing service raises, the interface, and the
record parser both the corpus loader and the web clients use."""
import abc
import dataclasses


@dataclasses.dataclass(frozen=True)
class Doc:
  id: str
  title: str
  text: str
  score: float = 0.0


class SearchError(RuntimeError):
  """A search service failed (after retries); the message is short enough to show the model."""


class SearchBackend(abc.ABC):
  """Maps a batch of queries to the top-k documents of each."""

  name = "backend"

  @abc.abstractmethod
  def search(self, queries, k):
    """Returns, for each query, up to k Docs, best first."""


def doc_from_record(rec, default_id="", score=0.0):
  if not isinstance(rec, dict):
    raise ValueError("record is not a JSON object")
  if "text" in rec or "title" in rec:
    title, text = str(rec.get("title") or ""), str(rec.get("text") or "")
  elif "contents" in rec:
    title, _, text = str(rec["contents"]).partition("\n")
    title = title.strip().strip('"')
  else:
    raise ValueError("record has neither text/title nor contents")
  if not (title or text):
    raise ValueError("record has empty title and text")
  return Doc(str(rec.get("id", default_id)), title, text, float(score))
