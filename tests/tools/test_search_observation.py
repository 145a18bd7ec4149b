"""The one search-observation renderer: varft's and the released scripts' exact bytes."""
from varft import prompts
from varft.data import demo
from varft.tools import search as search_lib


def test_exact_rendering_is_the_released_scripts():
  assert prompts.search_observation(["a b", "c"],
                                    exact=True) == ("<information> 1. Content:a b2. Content:c </information> ")
  assert prompts.search_observation([], exact=True) == "<information>  </information> "


def test_varft_rendering():
  assert prompts.search_observation(["a", "b"]) == "<information> 1. Content: a\n2. Content: b </information>"
  assert prompts.search_observation("only") == "<information> 1. Content: only </information>"
  assert prompts.search_observation([]) == "<information> No results found. </information>"


def test_tool_formats_use_the_renderer():
  docs = [search_lib.Doc("1", "Eiffel Tower", "Tower in   Paris."), search_lib.Doc("2", "T", "Snippet " * 300)]
  assert search_lib.format_results(docs, "paper_exact") == prompts.search_observation(
      ["Tower in   Paris.", "Snippet " * 300], exact=True)  # the snippet as it came: no title, not folded or cut
  assert search_lib.format_results(docs[:1], "paper") == prompts.search_observation(["Eiffel Tower. Tower in Paris."])


def test_demo_chains_render_results_as_the_released_code():
  docs = [{"title": "Acme", "text": "Acme makes anvils."}, {"title": "Ada", "text": "Ada founded Acme."}]
  assert demo._information(docs) == ("<information> 1. Content:Acme. Acme makes anvils.2. Content:Ada. Ada founded "
                                     "Acme. </information> ")
