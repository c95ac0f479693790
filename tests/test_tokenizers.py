"""Tokenizers: CLIP BPE ids against transformers' (golden file), truncation and padding;
the whole-word tokenizer of the built-in datasets."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.tokenizers import CLIPTokenizer, WordTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "transformers"
GOLDEN = json.loads((FIXTURES / "tokenizer_golden.json").read_text())
VOCAB = json.loads((FIXTURES / "tokenizer_sd1" / "vocab.json").read_text())
EOS_ID, BOS_ID = VOCAB["<|endoftext|>"], VOCAB["<|startoftext|>"]


def golden_case(folder: str, max_length: int) -> dict:
    return next(c for c in GOLDEN["cases"] if c["folder"] == folder and c["max_length"] == max_length)


@pytest.mark.parametrize("folder", ["tokenizer_sd1", "tokenizer_sd2"])
@pytest.mark.parametrize("max_length", [77, 12])
def test_ids_match_transformers(folder, max_length):
    """Casing, whitespace, punctuation, contractions, numbers, unicode (NFC), special tokens
    written in the text, empty and over-long prompts; SD1 pads with EOS, SD2 with `!`."""
    tokenizer = CLIPTokenizer.from_pretrained(str(FIXTURES / folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings: tested below
        ids, mask = tokenizer(GOLDEN["prompts"], max_length=max_length, return_attention_mask=True)
    case = golden_case(folder, max_length)
    assert ids.dtype == np.int32 and ids.shape == (len(GOLDEN["prompts"]), max_length)
    for prompt, row, expected in zip(GOLDEN["prompts"], ids, case["input_ids"]):
        assert row.tolist() == expected, prompt
    np.testing.assert_array_equal(mask, case["attention_mask"])


def test_pad_tokens_differ_between_sd1_and_sd2():
    sd1 = CLIPTokenizer.from_pretrained(str(FIXTURES / "tokenizer_sd1"))
    sd2 = CLIPTokenizer.from_pretrained(str(FIXTURES / "tokenizer_sd2"))
    assert (sd1.pad_token_id, sd2.pad_token_id) == (EOS_ID, 0)
    assert sd1("a cat")[0, -1] == EOS_ID and sd2("a cat")[0, -1] == 0
    assert sd1.model_max_length == 77 and sd1("a cat").shape == (1, 77)


def test_folder_saved_by_transformers_and_pipeline_root(tmp_path):
    """transformers 5 writes tokenizer.json (no vocab.json/merges.txt); a diffusers pipeline
    root keeps the files in tokenizer/."""
    saved = CLIPTokenizer.from_pretrained(str(FIXTURES / "tokenizer_saved"))
    np.testing.assert_array_equal(saved(GOLDEN["prompts"][:12]), golden_case("tokenizer_sd2", 77)["input_ids"][:12])
    shutil.copytree(FIXTURES / "tokenizer_sd1", tmp_path / "tokenizer")
    root = CLIPTokenizer.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(root(GOLDEN["prompts"][:12]), golden_case("tokenizer_sd1", 77)["input_ids"][:12])


def test_truncation_keeps_eos_and_warns_with_the_dropped_text():
    tokenizer = CLIPTokenizer.from_pretrained(str(FIXTURES / "tokenizer_sd1"))
    prompt = "a photograph of an astronaut riding a horse on the moon"
    with pytest.warns(UserWarning, match="truncated") as record:
        ids = tokenizer(prompt, max_length=6)
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID
    message = str(record[0].message)
    dropped = message.split("dropped: ")[1].strip("'")
    assert prompt.endswith(dropped) and "moon" in dropped
    # What was kept plus what was dropped is the whole prompt, token for token.
    kept = tokenizer(prompt[:len(prompt) - len(dropped)], max_length=77)
    assert kept[0, :6].tolist()[:-1] == ids[0, :-1].tolist()


def test_no_warning_when_the_prompt_fits():
    tokenizer = CLIPTokenizer.from_pretrained(str(FIXTURES / "tokenizer_sd1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer(["a cat", ""])


def test_missing_tokenizer_files_are_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- whole words

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "of", "two"]


def test_word_tokenizer_ids():
    tokenizer = WordTokenizer(WORDS, max_length=8)
    ids, mask = tokenizer(["A red circle, on the LEFT.", "two blue square"], return_attention_mask=True)
    w = {word: 4 + i for i, word in enumerate(WORDS)}  # after <pad> <unk> <bos> <eos>
    assert ids.tolist()[0] == [2, w["a"], w["red"], w["circle"], w["on"], w["the"], w["left"], 3]
    assert mask.tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert tokenizer.vocab_size == 4 + len(WORDS)
    assert tokenizer.decode(ids[0]) == "a red circle on the left"


def test_word_tokenizer_unknown_words_warn_and_map_to_unk():
    tokenizer = WordTokenizer(WORDS, max_length=8)
    with pytest.warns(UserWarning, match=r"\['squares'\]"):
        ids, mask = tokenizer("two blue squares", return_attention_mask=True)
    assert ids.tolist()[0] == [2, 13, 6, 1, 3, 0, 0, 0]
    assert mask.tolist()[0] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_word_tokenizer_truncation_keeps_eos():
    tokenizer = WordTokenizer(WORDS, max_length=5)
    with pytest.warns(UserWarning, match="dropped: 'left of a'"):
        ids = tokenizer("a red circle left of a")
    assert ids.tolist()[0] == [2, 4, 5, 7, 3]


def test_word_tokenizer_save_and_load(tmp_path):
    tokenizer = WordTokenizer(WORDS, max_length=7)
    tokenizer.save(str(tmp_path))
    loaded = WordTokenizer.load(str(tmp_path))
    assert loaded.words == tokenizer.words and loaded.max_length == 7
    np.testing.assert_array_equal(loaded("a red square"), tokenizer("a red square"))


@pytest.mark.parametrize("words, message", [(["a", "a"], "duplicate"), (["Red"], "lowercase"),
                                            (["two words"], "single words")])
def test_word_tokenizer_rejects_bad_vocabularies(words, message):
    with pytest.raises(ValueError, match=message):
        WordTokenizer(words)


def test_word_tokenizer_from_caption_vocabulary():
    render = pytest.importorskip("jaxdiff.data.render")
    if not hasattr(render, "caption_vocabulary"):
        pytest.skip("jaxdiff.data.render.caption_vocabulary() not written yet")
    tokenizer = WordTokenizer.from_captions()
    assert tokenizer.words == tuple(render.caption_vocabulary())
