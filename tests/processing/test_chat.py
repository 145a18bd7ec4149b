import numpy as np
import pytest

from tests import hf_tiny
from varft.models.qwen25vl import config as config_lib
from varft.processing import chat

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {
        "role": "user",
        "content": [{
            "type": "image"
        }, {
            "type": "text",
            "text": "What is shown? 图片里是什么？"
        }, {
            "type": "image"
        }, {
            "type": "text",
            "text": " Compare both."
        }]
    },
    {
        "role": "assistant",
        "content": "<think>A cat.</think> <answer>cat</answer>"
    },
    {
        "role": "user",
        "content": "And now?"
    },
]
EXPECTED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown? 图片里是什么？"
            "<|vision_start|><|image_pad|><|vision_end|> Compare both.<|im_end|>\n"
            "<|im_start|>assistant\n<think>A cat.</think> <answer>cat</answer><|im_end|>\n"
            "<|im_start|>user\nAnd now?<|im_end|>\n"
            "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tok")
  hf_tiny.write_processor_files(str(folder))
  return str(folder)


@pytest.fixture(scope="module")
def tokenizer():
  return chat.load_tokenizer()


def test_render_messages_is_the_qwen25vl_template(tokenizer_dir):
  assert chat.render_messages(MESSAGES) == EXPECTED
  hf_tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == EXPECTED
  system_first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert chat.render_messages(system_first, add_generation_prompt=False) == \
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_special_ids_match_the_model_config(tokenizer):
  assert tokenizer.image_pad_id == config_lib.IMAGE_TOKEN_ID
  assert tokenizer.vision_start_id == config_lib.VISION_START_TOKEN_ID
  assert tokenizer.vision_end_id == config_lib.VISION_END_TOKEN_ID
  assert (tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.pad_id) == (151644, 151645, 151643)
  assert tokenizer.eos_id == tokenizer.im_end_id
  assert tokenizer.vocab_size <= config_lib.get_config("3b").text.vocab_size


def test_encode_matches_transformers_and_is_incremental(tokenizer, tokenizer_dir):
  hf_tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  text = EXPECTED + "Let me look closer.\n```python\nimport cv2\n```<|im_end|>"
  assert tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]
  assert tokenizer.decode(tokenizer.encode(text)) == text
  # Appending a turn after a special token never changes the earlier tokens.
  first, second = EXPECTED, "Sure.<|im_end|>\n<|im_start|>user\nok"
  assert tokenizer.encode(first) + tokenizer.encode(second) == tokenizer.encode(first + second)


def test_load_tokenizer_from_folder_and_missing_folder(tokenizer, tokenizer_dir, tmp_path):
  assert chat.load_tokenizer(tokenizer_dir).encode(EXPECTED) == tokenizer.encode(EXPECTED)
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    chat.load_tokenizer(str(tmp_path))


def test_expand_image_pads_counts_per_image(tokenizer):
  grids = np.array([[1, 4, 6], [1, 2, 2]])
  ids = chat.encode_messages(tokenizer, MESSAGES, grids)
  pad = tokenizer.image_pad_id
  runs = np.diff(np.flatnonzero(np.diff(np.r_[0, np.asarray(ids) == pad, 0])))[::2]
  assert list(runs) == [6, 1]
  unexpanded = tokenizer.encode(chat.render_messages(MESSAGES))
  assert len(ids) == len(unexpanded) + 5
  with pytest.raises(ValueError, match="more <\\|image_pad\\|>"):
    chat.expand_image_pads(unexpanded, grids[:1])
  with pytest.raises(ValueError, match="3 image grids"):
    chat.expand_image_pads(unexpanded, np.concatenate([grids, grids[:1]]))


def test_rejects_unknown_message_parts():
  with pytest.raises(ValueError, match="neither text nor an image"):
    chat.render_messages([{"role": "user", "content": [{"type": "audio"}]}])


def test_vocabulary_is_qwen25_without_qwen3_added_tokens(tokenizer, tokenizer_dir):
  # The offline files list Qwen3's <think> (151667); Qwen2.5-VL splits the tag into ordinary tokens.
  ids = tokenizer.encode("<think>x</think>")
  assert max(ids) <= chat.LAST_QWEN25_TOKEN_ID and len(ids) > 3
  assert tokenizer.vocab_size == chat.LAST_QWEN25_TOKEN_ID + 1
  assert chat.load_tokenizer(tokenizer_dir).encode("<think>x</think>") == ids
