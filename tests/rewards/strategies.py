"""Hypothesis strategies for completions and reference steps (random and adversarial)."""
from hypothesis import strategies as st

CAT, CHINESE_ANSWER = "猫", "中文答案"  # wide characters
FRAGMENTS = ("<think>", "</think>", "<answer>", "</answer>", "<search>", "</search>", "<code>", "</code>", "<problem>",
             "</problem>", "```python", "```", "`", "{", "}", "'", ",", " ", "  ", "\n", "\t", "\u3000", "\xa0",
             "\u2028", "x", "Play well", "play", "The", "a", "rotation90", "rotation180", "'rotation90'", "'dark'",
             "{'dark', 'blur'}", CAT, CHINESE_ANSWER, "é", "<", ">", "<thi", "nk>", "</", "answer>", "import cv2",
             "</think> ", "!?", "\U0001F600")
TAGS = ("think", "answer", "search", "code", "problem")
PROBLEM_NAMES = ("rotation90", "rotation180", "dark", "overexposure", "blur", "noise", "crop", "none", "weird")
ANSWERS = ("Play well", "the Eiffel Tower", "1945", "中文答案", "play play well", "", "a", "Paris, France")

fragment_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=24).map("".join)
plain_text = st.one_of(st.sampled_from(ANSWERS), st.text(max_size=12))
inner_text = st.one_of(plain_text, plain_text, plain_text, fragment_soup)


@st.composite
def well_formed(draw, kind=None):
  """Completions close to the paper's formats, with random content and random damage."""
  think = draw(inner_text)
  gap = draw(st.sampled_from(["", " ", "\n", "\u3000", " x "]))
  kind = kind or draw(st.sampled_from(["answer", "search", "code", "problem"]))
  if kind == "code":
    body = draw(st.sampled_from(["", "\n"])) + "```python" + draw(inner_text) + draw(
        st.sampled_from(["```", "``", "````", "```python"])) + draw(inner_text)
  elif kind == "problem":
    names = draw(st.lists(st.sampled_from(PROBLEM_NAMES[:3] + PROBLEM_NAMES[-1:]), max_size=3))
    sep = draw(st.sampled_from([", ", ",", " , "]))
    body = draw(st.sampled_from(["", " "])) + "{" + sep.join(f"'{n}'" for n in names) + "}" + draw(
        st.sampled_from(["", " ", "\n"]))
  else:
    body = draw(inner_text)
  text = f"<think>{think}</think>{gap}<{kind}>{body}</{kind}>"
  # At most one piece of damage: a stray tag or character at the start, before the close, or at the end.
  piece = draw(st.sampled_from(["\n", " ", "x"] + [f"<{t}>" for t in TAGS] + [f"</{t}>" for t in TAGS]))
  cut = {
      "none": None,
      "start": 0,
      "inside": len(text) - len(kind) - 3,
      "end": len(text)
  }[draw(st.sampled_from(["none", "none", "start", "inside", "end"]))]
  return text if cut is None else text[:cut] + piece + text[cut:]


completions = st.one_of(well_formed(), fragment_soup, st.text(max_size=40))


@st.composite
def reference_steps(draw):
  """(task, reference dict): a paper-style solution string or explicit fields."""
  task = draw(st.sampled_from(["search", "coding"]))
  step = draw(st.sampled_from(["answer", "search"] if task == "search" else ["answer", "code", "problem"]))
  if step == "answer":
    target = draw(st.sampled_from(ANSWERS))
  elif step == "search":
    target = draw(st.sampled_from(["lego brand meaning", "Play well", "capital of France", "中文答案"]))
  elif step == "code":
    target = "```python\nimport cv2\n```"
  else:
    target = "{" + ", ".join(
        f"'{n}'" for n in draw(st.lists(st.sampled_from(PROBLEM_NAMES[:3] + PROBLEM_NAMES[-1:]), max_size=2))) + "}"
  if draw(st.booleans()):
    return task, {"solution": f"<think>reason</think><{step}>{target}</{step}>", "task": task}
  ref = {"task": task, "step_type": step}
  if step == "answer":
    ref["answers"] = [target] + draw(st.lists(st.sampled_from(ANSWERS), max_size=2))
  elif step == "search":
    ref["query"] = target
  elif step == "problem":
    ref["problems"] = draw(st.lists(st.sampled_from(PROBLEM_NAMES[:3] + PROBLEM_NAMES[-1:]), max_size=2))
  return task, ref


@st.composite
def samples(draw):
  """(completion, task, reference): the completion mostly attempts the reference's action."""
  task, ref = draw(reference_steps())
  step = ref.get("step_type") or next(k for k in ("answer", "search", "code", "problem") if f"<{k}>" in ref["solution"])
  text = draw(st.one_of(well_formed(step), well_formed(step), well_formed(), fragment_soup, st.text(max_size=40)))
  return text, task, ref
