"""What a person looks at: sample pages with the reference beside the model's turn and the agent prompt once;
TensorBoard text summaries of the samples and the images the tools produced."""
import os
import struct

from PIL import Image

from varft import metrics_writer, prompts
from varft.processing import chat


def _samples():
  user = chat.render_messages([{"role": "user", "content": prompts.user_text(prompts.SEARCH_AGENT, "Which year?")}])
  tool_image = Image.new("RGB", (32, 24), (0, 200, 0))
  return [{
      "text": f"--- user ---\n{user}\n--- assistant ---\n<think> t </think>\n<answer> 18{i}0 </answer>",
      "images": [tool_image],
      "id": f"q{i}",
      "reward": 0.5,
      "reference": "<answer> 1901 </answer>"
  } for i in range(3)]


def test_page_shows_the_agent_prompt_once_and_the_reference_beside_each_sample(tmp_path):
  path = metrics_writer.write_samples(str(tmp_path), 7, _samples())
  page = open(path).read()
  assert page.count("Do not repeat past queries") == 1  # the search agent prompt, in one collapsed block
  assert page.count("search agent prompt, shown once above") == 3
  assert page.count("&lt;answer&gt; 1901 &lt;/answer&gt;") == 3 and page.count("<th>reference</th>") == 3
  assert "&lt;answer&gt; 1810 &lt;/answer&gt;" in page and "reward=0.5" in page
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".png")]) == 3


def _events(directory):
  """(tag, kind) of every summary value in the TensorBoard event files under `directory`."""
  from tensorboardX.proto import event_pb2
  out = []
  for name in os.listdir(directory):
    data = open(os.path.join(directory, name), "rb").read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      out += [(v.tag,
               v.WhichOneof("value") if not v.metadata.plugin_data.plugin_name else v.metadata.plugin_data.plugin_name)
              for v in event.summary.value]
  return out


def test_tensorboard_gets_sample_text_and_tool_images(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write_samples(3, _samples())
  writer.write_samples(4, _samples())
  writer.close()
  events = _events(tmp_path / "tb")
  tags = [tag for tag, _ in events]
  assert tags.count("samples/0/text_summary") == 2 or tags.count("samples/0") == 2, tags
  assert ("samples/1/image_0", "image") in events
  assert sum("prompt/search" in tag for tag in tags) == 1  # the agent prompt is written once per run
