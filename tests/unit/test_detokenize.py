"""Incremental detokenization: whole characters only, no part of a stop string, same text as a full decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.detokenize import BytesTokenizer, IncrementalDetokenizer
from engine.logprobs import byte_decoder
from settings import DEFAULT_MODEL_DIR
from testing.checkpoints import build_tokenizer

MULTILINGUAL = [
    "Café crème, naïve façade, Straße und Fußgängerübergang.",
    "日本語のテキストを分割します。東京と大阪。",
    "Emoji: 🎉🚀 ok 👍🏽 and 🇫🇷 flags, ∑ symbols ≠ ascii.",
    "Return the number of items in the container. Raise ValueError if negative.",
] * 30


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """Byte-level BPE with a small vocabulary: most non-ASCII characters span several tokens."""
    return build_tokenizer(tmp_path_factory.mktemp("tok-ml"), vocab_size=330, corpus=MULTILINGUAL)


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """SentencePiece-style: words carry their leading space as '▁', which decoding a lone token loses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(MULTILINGUAL, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(tmp_path_factory.mktemp("tok-ms"))
    return fast


def byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text`` (the byte-level alphabet's single-byte tokens)."""
    char = {b: c for c, b in byte_decoder().items()}
    return [tokenizer.convert_tokens_to_ids(char[b]) for b in text.encode()]


def run(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """Deltas of ``ids`` fed one by one (the last one is the flush), and whether a stop string ended it."""
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, detok.stopped


def test_a_character_split_over_byte_tokens_comes_out_whole(multilingual) -> None:
    ids = byte_ids(multilingual, "a日b🎉")
    deltas, _ = run(multilingual, ids)
    assert deltas == ["a", "", "", "日", "b", "", "", "", "🎉", ""]
    assert not any("\ufffd" in d for d in deltas)


def test_an_incomplete_character_at_the_end_is_flushed_as_the_full_decode_shows_it(multilingual) -> None:
    ids = byte_ids(multilingual, "ok日")[:-1]  # the last byte of 日 never comes
    deltas, _ = run(multilingual, ids)
    assert deltas[:-1] == ["o", "k", "", ""]
    assert deltas[-1] == "\ufffd" == multilingual.decode(ids[2:])


def test_invalid_bytes_are_released_once_followed_by_a_whole_character() -> None:
    detok = IncrementalDetokenizer(BytesTokenizer())
    assert [detok.add(b) for b in (0x80, ord("a"))] == ["", "\ufffda"]


def test_a_stop_string_split_across_tokens_is_held_back_then_cut(multilingual) -> None:
    deltas, stopped = run(multilingual, byte_ids(multilingual, "Return the number"), stop=(" num",))
    assert stopped and "".join(deltas) == "Return the"
    assert all(" n" not in d for d in deltas)
    ids = multilingual("Return the number", add_special_tokens=False)["input_ids"]
    deltas, stopped = run(multilingual, ids, stop=("the nu",))
    assert stopped and "".join(deltas) == "Return "


def test_held_text_that_does_not_become_a_stop_string_is_released() -> None:
    detok = IncrementalDetokenizer(BytesTokenizer(), stop=("END",))
    assert [detok.add(b) for b in b"xEN"] == ["x", "", ""]
    assert detok.add(ord("x")) == "ENx" and not detok.stopped


def test_held_text_is_flushed_when_the_row_ends() -> None:
    detok = IncrementalDetokenizer(BytesTokenizer(), stop=("END",))
    assert [detok.add(b) for b in b"okE"] == ["o", "k", ""]
    assert detok.flush() == "E" and not detok.stopped


def test_the_earliest_of_several_stop_strings_cuts_and_text_after_it_is_dropped() -> None:
    detok = IncrementalDetokenizer(BytesTokenizer(), stop=("yz", "b", "abc"))
    # "a" might begin "abc": held; "b" is itself a stop string at index 1
    assert [detok.add(b) for b in b"ab"] == ["", "a"] and detok.stopped
    assert detok.add(ord("z")) == "" and detok.flush() == ""


def test_a_stop_string_within_the_first_min_tokens_tokens_does_not_end_the_row() -> None:
    detok = IncrementalDetokenizer(BytesTokenizer(), stop=("b",), min_tokens=3)
    assert "".join(detok.add(b) for b in b"abab") == "aba" and detok.stopped  # the first "b" was token 2
    # vLLM's rule: a stop string counts once it ends past the text of the first min_tokens tokens,
    # even when it begins within it ("xy" spans tokens 2 and 3 here).
    detok = IncrementalDetokenizer(BytesTokenizer(), stop=("xy",), min_tokens=2)
    assert "".join(detok.add(b) for b in b"axy") == "a" and detok.stopped
    detok = IncrementalDetokenizer(BytesTokenizer(), stop=("xy",), min_tokens=3)
    assert "".join(detok.add(b) for b in b"axyz") + detok.flush() == "axyz" and not detok.stopped


@pytest.mark.parametrize("which", ["multilingual", "embedded"])
def test_min_tokens_matches_vllms_rule_on_real_text(which: str, request) -> None:
    """Cut at the first stop string that ends past the decode of the first ``min_tokens`` tokens."""
    tokenizer = (
        AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR) if which == "embedded" else request.getfixturevalue(which)
    )
    rng = random.Random(99)
    texts = [MULTILINGUAL[3], "a ab abc abcd ab a", "the cat and the hat and the bat"]
    held_runs = 0
    for _ in range(200):
        text = rng.choice(texts)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        min_tokens = rng.randint(0, len(ids))
        free = len(tokenizer.decode(ids[:min_tokens], skip_special_tokens=True))
        stop = (rng.choice(["a", "ab", "the", "t", " a", "in", "xyz"]),)
        cuts = [i for i in range(len(full)) if full.startswith(stop[0], i) and i + len(stop[0]) > free]
        expected = full[: cuts[0]] if cuts else full
        detok = IncrementalDetokenizer(tokenizer, stop, min_tokens=min_tokens)
        emitted = ""
        for token in ids:
            emitted += detok.add(token)
            assert expected.startswith(emitted), (text, stop, min_tokens, emitted)
            if detok.stopped:
                break
        emitted += detok.flush()
        assert emitted == expected and detok.stopped == bool(cuts), (text, stop, min_tokens)
        held_runs += stop[0] in full[:free]
    assert held_runs > 30  # many runs had a stop string within the first min_tokens tokens' text


def test_a_stop_string_inside_one_token(multilingual) -> None:
    ids = multilingual("Return the number of items in the container.", add_special_tokens=False)["input_ids"]
    token = max(ids, key=lambda i: len(multilingual.decode([i])))
    text = multilingual.decode([token])
    assert len(text) >= 3, text
    deltas, stopped = run(multilingual, [token], stop=(text[1:3],))
    assert stopped and deltas == [text[:1]]


def test_special_tokens_are_skipped(multilingual) -> None:
    eos = multilingual.eos_token_id
    deltas, _ = run(multilingual, [*byte_ids(multilingual, "é"), eos])
    assert "".join(deltas) == "é"


@pytest.mark.parametrize("which", ["multilingual", "metaspace", "embedded"])
def test_deltas_join_to_the_full_decode_cut_at_the_first_stop_string(which: str, request) -> None:
    tokenizer = (
        AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR) if which == "embedded" else request.getfixturevalue(which)
    )
    rng = random.Random(1234)
    vocab = len(tokenizer)
    texts = [*MULTILINGUAL[:4], "a ab abc abcd", "ééé 日日 🎉🎉"]
    checked = stopped_runs = 0
    for case in range(400):
        if case % 2:  # real text, so that stop strings occur
            text = rng.choice(texts)
            ids = tokenizer(text[rng.randrange(len(text)) :], add_special_tokens=False)["input_ids"]
        else:  # any tokens at all: broken characters, special tokens, invalid bytes
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        stop: tuple[str, ...] = ()
        if full and rng.random() < 0.7:
            start = rng.randrange(len(full))
            stop = (full[start : start + rng.randint(1, 4)], rng.choice(["abc", "日本", "\n", "ss"]))
        cuts = [i for i in (full.find(s) for s in stop if s) if i >= 0]
        expected = full[: min(cuts)] if cuts else full
        detok = IncrementalDetokenizer(tokenizer, stop)
        emitted = ""
        for token in ids:
            delta = detok.add(token)
            if "\ufffd" in delta:  # every U+FFFD released is one the full decode has at that place
                for offset, char in enumerate(delta):
                    assert char != "\ufffd" or full[len(emitted) + offset] == "\ufffd"
            emitted += delta
            # at every step, what is out is final: never a character that changes, never a part
            # of the stop string that comes later
            assert expected.startswith(emitted), (ids, stop, emitted)
            if detok.stopped:
                break
        emitted += detok.flush()
        assert emitted == expected, (ids, stop)
        assert detok.stopped == bool(cuts)
        checked += 1
        stopped_runs += bool(cuts)
    assert checked == 400 and stopped_runs > 50


def test_work_per_token_does_not_grow_with_the_text(multilingual) -> None:
    """Each step decodes a short window, never the whole row."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return multilingual.decode(ids, **kwargs)

    detok = IncrementalDetokenizer(Counting())
    ids = multilingual(MULTILINGUAL[0] * 8, add_special_tokens=False)["input_ids"]
    for token in ids:
        detok.add(token)
    assert len(ids) > 100 and max(calls) <= 8


def test_embedded_model_tokenizer_is_byte_level_with_the_standard_alphabet() -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert byte_decoder() == {c: b for b, c in bytes_to_unicode().items()}
    assert Path(DEFAULT_MODEL_DIR, "tokenizer.json").is_file()
