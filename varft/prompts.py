"""The paper's prompts (Visual-ARFT, Liuziyu77/Visual-RFT/Visual-ARFT) and the text of tool observations.

The system prompts are the paper's, verbatim: released checkpoints were trained with them. As in the paper, the
agent prompt goes at the start of the (single) user message, before the query (`<query> ... </query>`), and the
chat template's default system turn stays in place. In step-wise samples the earlier steps follow the query.
The released coding eval script writes its first prompt slightly differently (`released_coding_text`).
"""
from __future__ import annotations

from collections.abc import Sequence

from varft import tags

SEARCH_AGENT = """# Role  
You are a step-by-step multimodal reasoning assistant.  
Given an image, a question, and optional partial reasoning chain, your task is to solve the problem **one substep at a time**.  

# Guiding Principles  
At each turn, you must **either**:  
1. Issue **one specific, text-only search** enclosed in <search> </search> tags,  
2. Or provide the **final answer** enclosed in <answer> </answer> tags.  

All outputs **must begin with a thought** enclosed in <think> </think> tags, explaining your current reasoning and what to do next.  

- Do not reference \u201cthe image\u201d in your searches.  
- Do not repeat past queries.  
- Only output **one action per step**: either <search> or <answer>, never both.  
- When ready to conclude, summarize reasoning and give a final answer.

# Output Format (strict):  
Always start with <think>. Do not output the previous reasoning chain. Then, depending on the case, output one of the following:

## 1. If reasoning continues:  
<think> Your current reasoning and next plan </think>  
<search> One precise, retrievable textual query </search>

## 2. If ready to conclude:  
<think> Summarize all reasoning and derive the answer </think>  
<answer> Final answer, as briefly as possible </answer>

# Current reasoning chain:
"""

CODING_AGENT = """# Role
You are a step-by-step image processing assistant.
Your task is to solve an image-based task by applying OpenCV operations one step at a time, optionally using a reasoning chain.

# Output Format
At each step, output **only one** of the following, preceded by a <think> tag:
1. <problem> Describe the image issue from """ + tags.problem_set_text() + """ </problem>
2. <code> OpenCV code to process and save the image </code>
3. <answer> Final answer based on the processed image </answer>

# Image Processing Rules
- Always read from `'path_to_input_image.jpg'` and write to `'path_to_output_image.jpg'`.

# Output Format (strict):
Always begin with <think>. Then, depending on current reasoning chain, output one of the following:

## 1. If this is the first step and only the query is given, output in the following format:
<think> Initial analysis of the image issue. </think>
<problem> {'problem1', ...} </problem>

## 2. If <problem> is given, continue with image operations:
<think> Explain what to fix next. </think>
<code>
```python
One Python code block using OpenCV to perform the operation, and save the processed images.
```
</code>

## 3. If ready to conclude:
<think> Summarize the processing steps and provide the result or outcome </think> 
<answer> Final answer, as briefly as possible</answer>

# Current reasoning chain:
"""

SYSTEM_PROMPTS = {"search": SEARCH_AGENT, "coding": CODING_AGENT, "multihop": SEARCH_AGENT}


def system_prompt(name: str) -> str:
  """The agent prompt by name (`search`, `coding`, `multihop`), or the literal text if it is not a name."""
  return SYSTEM_PROMPTS.get(name, name)


def user_text(system: str, question: str, context: str = "") -> str:
  """The text of the first user message: agent prompt, query, and (step-wise) the earlier steps."""
  text = f"{system}\n<query> {question} </query>"
  return f"{text}\n{context}" if context else text


def released_coding_text(system: str, question: str) -> str:
  """The released coding eval script's first prompt text: `{system}<query> {question} <query>` (no newline after
  the agent prompt, `<query>` again where `</query>` was meant)."""
  return f"{system}<query> {question} <query>"


def search_observation(snippets: Sequence[str] | str, exact: bool = False) -> str:
  """The one renderer of search results (the tools, the rollout and the demo data all use it).

  varft's: `<information> 1. Content: ...\n2. Content: ... </information>` (one line per result; no results said
  so). `exact`: the released eval scripts' bytes, `'<information> '` + `f'{i}. Content:{snippet}'` for each result
  with no separator + `' </information> '` (trailing space included), which their models read.
  """
  if isinstance(snippets, str):
    snippets = [snippets] if snippets else []
  if exact:
    return "<information> " + "".join(f"{i}. Content:{s}" for i, s in enumerate(snippets, 1)) + " </information> "
  if not snippets:
    return "<information> No results found. </information>"
  return "<information> " + "\n".join(f"{i}. Content: {s}" for i, s in enumerate(snippets, 1)) + " </information>"


def problem_tip(problems: Sequence[str]) -> str:
  """The paper's hint after a `<problem>` step (its evaluation loop), shown to the model as the next user turn."""
  problems = list(problems)
  if problems and problems[0] == "crop":
    return ("<tips> We now need to crop the image. Please provide the Python code. Use [x_min, y_min, x_max, y_max] "
            "to represent the bounding box coordinates. </tips>")
  if problems and problems[0] == "none":
    return "<tips> The image has no issues, so no code is needed in the next step. You can directly provide the answer. </tips>"
  return (f"<tips> Now that we have identified the issue in the image: {problems}, please proceed to address it by "
          "outputting the python code. </tips>")


# The paper's direct-answer baselines (its evaluation_*_df.py): the question, a newline, then one instruction; no
# agent prompt, one turn. The MAT benchmarks (one image) and the text-only multi-hop QA sets use different ones.
DIRECT_ANSWER_WITH_IMAGE = "Answer the question directly. The answer should be very brief."
DIRECT_ANSWER_TEXT_ONLY = "Only Return the answer."


def direct_answer_text(question: str, with_image: bool) -> str:
  """The user text of a direct-answer baseline turn (shown after the image when there is one)."""
  return f"{question}\n{DIRECT_ANSWER_WITH_IMAGE if with_image else DIRECT_ANSWER_TEXT_ONLY}"
