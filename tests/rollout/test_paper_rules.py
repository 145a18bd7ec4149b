"""The released eval scripts' turn rules (`varft.paper_rules`), case by case."""
from varft import paper_rules, prompts


def kinds(actions):
  return [(a.kind, a.content) for a in actions]


def test_search_turns():
  read = lambda text, last=None: kinds(paper_rules.read_turn(text, "search", last))
  assert read("<think> t </think>\n<answer> Paris </answer><search> x </search>") == [("answer", "Paris")]
  assert read("<answer>\n  Paris\n</answer>") == [("answer", "Paris")]  # \s* spans the newlines around it
  assert read("<answer> Paris\nFrance </answer>")[0][0] == "malformed"  # no DOTALL: a two-line answer is none
  assert read("<answer></answer>") == [("answer", "")]
  assert read("<search> capital of France </search> then more text <search> b </search>") == [("search",
                                                                                               "capital of France")]
  assert read("<search> unclosed", last="earlier query") == [("search", "earlier query")]
  assert read("<search> unclosed")[0][0] == "malformed"
  assert read("<think> only thinking </think>")[0][0] == "malformed"
  assert read("<code>x</code>")[0][0] == "malformed"  # the search script knows no code


def test_coding_turns():
  read = lambda text: paper_rules.read_turn(text, "coding")
  problem, = read("<think> t </think>\n<problem> {'noise', 'blur'} </problem>")
  assert problem.kind == "problem" and problem.problems == ("blur", "noise")  # sorted, as extract_problems
  assert read("<problem> noise </problem>")[0].kind == "malformed"  # no quoted set: the script stops here
  both = read("<problem> {'crop'} </problem>\n<code>\n```python\nprint(1)\n```\n</code>")
  assert [a.kind for a in both] == ["problem", "code"] and both[1].content == "\nprint(1)\n"
  unfenced, = read("<code> print(1) </code>")
  assert unfenced.kind == "code" and unfenced.content == "" and unfenced.error
  assert read("<answer> 42 </answer><code>```python\nx\n```</code>")[0].content == "42"
  assert read("no tags")[0].kind == "malformed"


def test_chain_steps():
  search, = paper_rules.read_turn("<search> q </search>", "search")
  assert paper_rules.chain_step("T", search,
                                "<information> ... </information> ") == ("\nT\n<information> ... </information> ")
  crop, = paper_rules.read_turn("<problem> {'crop'} </problem>", "coding")
  assert paper_rules.chain_step("T", crop, "") == f"\nT\n{prompts.problem_tip(['crop'])}\n"
  none, = paper_rules.read_turn("<problem> {'none'} </problem>", "coding")
  assert paper_rules.chain_step("T", none, "") == "\nT\n<tips> The image has no issues, so no code is needed in " \
      "the next step. You can directly provide the answer. </tips>"
  code, = paper_rules.read_turn("<code>```python\nx\n```</code>", "coding")
  assert paper_rules.chain_step("T", code, "printed") == "\nT"
  assert paper_rules.problem_set([search]) is None and paper_rules.problem_set([crop, code]) == ("crop",)


def test_released_coding_prompt():
  assert prompts.released_coding_text("AGENT\n", "What?") == "AGENT\n<query> What? <query>"
