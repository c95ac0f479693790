"""Text -> token ids for the text encoders.

- `CLIPTokenizer`: CLIP's byte-level BPE, read from a checkpoint's tokenizer files and
  run by the `tokenizers` library, configured to give the ids of transformers'
  `CLIPTokenizer` (which 5.x also exports as `CLIPTokenizerFast`).
- `T5Tokenizer`: T5's / UMT5's SentencePiece unigram model, read from a checkpoint's
  `tokenizer.json` and run by the `tokenizers` library (ids of transformers' T5 tokenizer).
- `WordTokenizer`: a whole-word vocabulary for the built-in caption datasets; saved
  next to a trained model so the model ships with its tokenizer.

All return int32 arrays [B, max_length]: (BOS,) the text, EOS, then padding (T5 has no
BOS); prompts that do not fit are cut (EOS kept last) with a warning naming what was dropped.
`MultiTokenizer` runs several (SD3's CLIP-L, CLIP-G and T5), each to its own length; `WanTokenizer`
runs UMT5's as Wan's pipelines do (cleaned prompts, ids and attention mask).
"""
from __future__ import annotations

import html
import json
import os
import re
import warnings
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

# CLIP's word split: contractions, runs of letters, single digits, runs of other
# non-space symbols; the special tokens first so they stay whole.
CLIP_WORD_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                     r"""[^\s\p{L}\p{N}]+""")
END_OF_WORD = "</w>"
CLIP_DEFAULT_MAX_LENGTH = 77


def _pack(rows: list[list[int]], max_length: int, pad_id: int, return_attention_mask: bool):
    """Pads equal-or-shorter id lists to [B, max_length] int32 (and the 1/0 mask of real tokens)."""
    ids = np.full((len(rows), max_length), pad_id, np.int32)
    mask = np.zeros((len(rows), max_length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return (ids, mask) if return_attention_mask else ids


def _as_list(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def _wrapped_rows(tokenizer, texts: list[str], max_length: int, prefix: list[int], suffix: list[int]) -> list[list[int]]:
    """Each text's ids (a `tokenizers.Tokenizer`, no special tokens) between `prefix` and `suffix`, cut to fit
    max_length with a warning naming what was dropped."""
    room = max_length - len(prefix) - len(suffix)
    rows = []
    for text, encoding in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False)):
        ids = encoding.ids
        if len(ids) > room:
            _warn_truncated(text, text[encoding.offsets[room][0]:], max_length, stacklevel=3)
            ids = ids[:room]
        rows.append([*prefix, *ids, *suffix])
    return rows


def _warn_truncated(text: str, dropped: str, max_length: int, stacklevel: int) -> None:
    """stacklevel: of the caller's frame, so that the warning points at the user's call."""
    warnings.warn(f"prompt {text!r} is longer than {max_length} tokens and was truncated; "
                  f"dropped: {dropped!r}", stacklevel=stacklevel + 1)


# --------------------------------------------------------------------------- CLIP BPE


SPECIAL_TOKEN_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                          "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def added_token(value: str | dict) -> AddedToken:
    """A special token as tokenizer files write it: a plain string (matched verbatim in the
    raw text) or a dict of AddedToken fields (`normalized: true` matches after lowercasing)."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    return AddedToken(value["content"], special=value.get("special", True), normalized=value.get("normalized", False),
                      lstrip=value.get("lstrip", False), rstrip=value.get("rstrip", False),
                      single_word=value.get("single_word", False))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_merges(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def _read_bpe(folder: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges from vocab.json + merges.txt, or from the model section of a tokenizer.json."""
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        return _read_json(vocab_file), _read_merges(merges_file)
    model = _read_json(os.path.join(folder, "tokenizer.json")).get("model")
    if not model or model.get("type") != "BPE":
        raise FileNotFoundError(f"{folder!r} has neither vocab.json + merges.txt nor a BPE tokenizer.json")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _tokenizer_folder(folder: str) -> str:
    """The folder itself, or its `tokenizer/` subfolder (a diffusers pipeline root)."""
    for candidate in (folder, os.path.join(folder, "tokenizer")):
        if any(os.path.isfile(os.path.join(candidate, f)) for f in ("vocab.json", "tokenizer.json")):
            return candidate
    raise FileNotFoundError(f"no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json) in {folder!r}")


def clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str,
             added_tokens: Sequence[AddedToken]) -> Tokenizer:
    """A `tokenizers` pipeline giving CLIP's ids (without BOS/EOS, which the caller adds).

    NFC, whitespace runs -> one space, lowercase; CLIP's word split; GPT-2's byte-to-
    unicode map; BPE whose word-final symbols carry `</w>`. Added (special) tokens are
    cut out of the text first, as transformers does for every special token, the pad
    token included: with SD2's pad `!`, "hi!" ends in id 0, not in the BPE token "!</w>".
    """
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk_token, end_of_word_suffix=END_OF_WORD,
                              continuing_subword_prefix="", fuse_unk=False))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.add_tokens(list(added_tokens))
    return tokenizer


class CLIPTokenizer:
    """CLIP's BPE tokenizer; ids identical to transformers' `CLIPTokenizer`.

    Call it with a prompt or a list of prompts: returns input_ids [B, max_length] int32
    (and the attention mask [B, max_length], 1 = real token, with return_attention_mask).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, bos_token: str = "<|startoftext|>",
                 eos_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 model_max_length: int = CLIP_DEFAULT_MAX_LENGTH, added_tokens: Sequence[AddedToken] | None = None):
        """added_tokens: how each special token is matched in text (default: the four, verbatim)."""
        missing = [t for t in (bos_token, eos_token, pad_token, unk_token) if t not in vocab]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        if added_tokens is None:
            added_tokens = [added_token(t) for t in dict.fromkeys((bos_token, eos_token, unk_token, pad_token))]
        self._tokenizer = clip_bpe(vocab, merges, unk_token, added_tokens)
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]
        self.vocab_size = len(vocab)
        self.model_max_length = model_max_length

    @classmethod
    def from_pretrained(cls, folder: str) -> "CLIPTokenizer":
        """From a transformers tokenizer folder (or a diffusers pipeline root with `tokenizer/`).

        Special tokens and `model_max_length` come from tokenizer_config.json and
        special_tokens_map.json (the latter wins): SD1's pad token is `<|endoftext|>`, SD2's `!`.
        """
        folder = _tokenizer_folder(folder)
        vocab, merges = _read_bpe(folder)
        tokenizer_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        config = {**tokenizer_config, **_read_json(os.path.join(folder, "special_tokens_map.json"))}
        specials = {name: config.get(name) or default for name, default in SPECIAL_TOKEN_DEFAULTS.items()}
        # How each token is matched: the last word wins, as in transformers: special tokens in
        # attribute order (SD1's plain-string pad makes `<|endoftext|>` verbatim-only), then the
        # explicit lists of tokenizer_config.json and tokenizer.json.
        added = {}
        for value in [*specials.values(), *tokenizer_config.get("added_tokens_decoder", {}).values(),
                      *_read_json(os.path.join(folder, "tokenizer.json")).get("added_tokens", [])]:
            token = added_token(value)
            added[token.content] = token
        max_length = config.get("model_max_length", CLIP_DEFAULT_MAX_LENGTH)
        return cls(vocab, merges, **{name: added_token(v).content for name, v in specials.items()},
                   added_tokens=list(added.values()),
                   # tokenizer configs without a limit store a huge sentinel (int(1e30))
                   model_max_length=max_length if max_length < 1e6 else CLIP_DEFAULT_MAX_LENGTH)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
                 return_attention_mask: bool = False):
        """texts -> input_ids [B, max_length] int32: BOS, the text, EOS, padding (and the mask if asked).

        max_length defaults to the folder's `model_max_length` (77 for CLIP).
        """
        texts = _as_list(texts)
        max_length = max_length or self.model_max_length
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS")
        rows = _wrapped_rows(self._tokenizer, texts, max_length, [self.bos_token_id], [self.eos_token_id])
        return _pack(rows, max_length, self.pad_token_id, return_attention_mask)


# --------------------------------------------------------------------------- T5 SentencePiece


T5_DEFAULT_MAX_LENGTH = 512


def _t5_tokenizer_folder(folder: str) -> str | None:
    """The folder (or its `tokenizer/` subfolder) whose tokenizer.json holds a unigram model, if any."""
    for candidate in (folder, os.path.join(folder, "tokenizer")):
        model = _read_json(os.path.join(candidate, "tokenizer.json")).get("model") or {}
        if model.get("type") == "Unigram":
            return candidate
    return None


class T5Tokenizer:
    """T5's SentencePiece tokenizer (unigram), as transformers' T5 tokenizer encodes with
    `padding="max_length", truncation=True`: the text's pieces, EOS, then padding; no BOS.

    The pipeline (normaliser, whitespace split, metaspace, unigram model, special tokens such as
    `<extra_id_0>`) is the checkpoint's `tokenizer.json`, run by the `tokenizers` library. Folders
    with only the SentencePiece `spiece.model` are not read: transformers writes tokenizer.json
    when it saves the tokenizer (`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`).
    """

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str = "</s>", pad_token: str = "<pad>",
                 model_max_length: int = T5_DEFAULT_MAX_LENGTH):
        missing = [t for t in (eos_token, pad_token) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.eos_token_id, self.pad_token_id = tokenizer.token_to_id(eos_token), tokenizer.token_to_id(pad_token)
        self.vocab_size = tokenizer.get_vocab_size()
        self.model_max_length = model_max_length

    @classmethod
    def from_pretrained(cls, folder: str) -> "T5Tokenizer":
        """From a transformers tokenizer folder with tokenizer.json (or a folder with `tokenizer/`).

        EOS, pad and `model_max_length` come from tokenizer_config.json / special_tokens_map.json
        (defaults `</s>`, `<pad>`, 512)."""
        found = _t5_tokenizer_folder(folder)
        if found is None:
            extra = (" (it has only spiece.model: save the tokenizer with transformers to write tokenizer.json)"
                     if os.path.isfile(os.path.join(folder, "spiece.model")) else "")
            raise FileNotFoundError(f"no tokenizer.json with a unigram (SentencePiece) model in {folder!r}{extra}")
        config = {**_read_json(os.path.join(found, "tokenizer_config.json")),
                  **_read_json(os.path.join(found, "special_tokens_map.json"))}
        token = lambda name, default: added_token(config.get(name) or default).content
        max_length = config.get("model_max_length", T5_DEFAULT_MAX_LENGTH)
        return cls(Tokenizer.from_file(os.path.join(found, "tokenizer.json")), eos_token=token("eos_token", "</s>"),
                   pad_token=token("pad_token", "<pad>"),
                   # tokenizer configs without a limit store a huge sentinel (int(1e30))
                   model_max_length=max_length if max_length < 1e6 else T5_DEFAULT_MAX_LENGTH)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
                 return_attention_mask: bool = False):
        """texts -> input_ids [B, max_length] int32: the text, EOS, padding (and the mask if asked).

        max_length defaults to the folder's `model_max_length` (512 for T5; SD3 passes 256, Flux 512).
        """
        texts = _as_list(texts)
        max_length = max_length or self.model_max_length
        if max_length < 1:
            raise ValueError(f"max_length={max_length} leaves no room for EOS")
        rows = _wrapped_rows(self._tokenizer, texts, max_length, [], [self.eos_token_id])
        return _pack(rows, max_length, self.pad_token_id, return_attention_mask)


# --------------------------------------------------------------------------- whole words


WORD_PATTERN = re.compile(r"\w+")
WORD_TOKENIZER_FILE = "word_tokenizer.json"


class WordTokenizer:
    """Whole-word tokenizer for captions built from a known, small vocabulary.

    ids: 0 <pad>, 1 <unk>, 2 <bos>, 3 <eos>, then the words in the order given. EOS is
    not 2 on purpose: a CLIP text config with eos_token_id == 2 pools by transformers'
    legacy argmax rule. Text is lowercased and split into runs of word characters, so
    whitespace and punctuation only separate words.
    """

    SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
    pad_token_id, unk_token_id, bos_token_id, eos_token_id = range(4)

    def __init__(self, words: Sequence[str], max_length: int = 16):
        words = list(words)
        bad = [w for w in words if WORD_PATTERN.fullmatch(w) is None or w != w.lower()]
        if bad:
            raise ValueError(f"vocabulary entries must be lowercase single words (letters, digits, _): {bad}")
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise ValueError(f"vocabulary has duplicate words: {duplicates}")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for BOS and EOS")
        self.words = tuple(words)
        self.max_length = max_length
        self._ids = {w: i for i, w in enumerate(self.SPECIAL_TOKENS + self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self._ids)

    @classmethod
    def from_captions(cls, max_length: int = 16) -> "WordTokenizer":
        """The vocabulary of the built-in caption datasets (`jaxdiff.data.render.caption_vocabulary()`)."""
        from jaxdiff.data.render import caption_vocabulary  # data code loads only when asked for

        return cls(caption_vocabulary(), max_length)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None, return_attention_mask: bool = False):
        """texts -> input_ids [B, max_length] int32 (and the mask, 1 = real token, if asked); max_length defaults
        to the tokenizer's own."""
        max_length = max_length or self.max_length
        rows = []
        for text in _as_list(texts):  # a loop, not a comprehension: warnings point at the caller
            rows.append(self._encode(text, max_length))
        return _pack(rows, max_length, self.pad_token_id, return_attention_mask)

    @property
    def model_max_length(self) -> int:
        """The length its model was trained on (as CLIP's and T5's tokenizers name it)."""
        return self.max_length

    def _encode(self, text: str, max_length: int) -> list[int]:
        words = WORD_PATTERN.findall(text.lower())
        unknown = sorted({w for w in words if w not in self._ids})
        if unknown:
            warnings.warn(f"words not in the vocabulary, mapped to <unk>: {unknown} (in {text!r})", stacklevel=3)
        if len(words) > max_length - 2:
            _warn_truncated(text, " ".join(words[max_length - 2:]), max_length, stacklevel=3)
            words = words[:max_length - 2]
        return [self.bos_token_id, *(self._ids.get(w, self.unk_token_id) for w in words), self.eos_token_id]

    def decode(self, ids) -> str:
        """ids [L] -> the words (and <unk>s), space-separated; BOS, EOS and padding left out."""
        tokens = self.SPECIAL_TOKENS + self.words
        structural = (self.pad_token_id, self.bos_token_id, self.eos_token_id)
        return " ".join(tokens[i] for i in np.asarray(ids).tolist() if i not in structural)

    def save(self, folder: str) -> None:
        """Writes folder/word_tokenizer.json."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, WORD_TOKENIZER_FILE), "w") as f:
            json.dump({"type": "WordTokenizer", "max_length": self.max_length, "words": list(self.words)}, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "WordTokenizer":
        data = _read_json(os.path.join(folder, WORD_TOKENIZER_FILE))
        if data.get("type") != "WordTokenizer":
            raise FileNotFoundError(f"no {WORD_TOKENIZER_FILE} describing a WordTokenizer in {folder!r}")
        return cls(data["words"], data["max_length"])


class MultiTokenizer:
    """Several tokenizers, each to its own length: prompts -> a tuple of input_ids arrays [B, length_i], the
    ids of a pipeline with several text encoders (`jaxdiff.models.text_encoders`)."""

    def __init__(self, tokenizers: Sequence, lengths: Sequence[int]):
        if len(tokenizers) != len(lengths):
            raise ValueError(f"{len(tokenizers)} tokenizers but {len(lengths)} lengths")
        self.tokenizers, self.lengths = tuple(tokenizers), tuple(lengths)

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, ...]:
        return tuple(t(texts, max_length=n) for t, n in zip(self.tokenizers, self.lengths))


def clean_prompt(text: str) -> str:
    """diffusers' Wan `prompt_clean`: ftfy.fix_text when ftfy is installed (as diffusers does), HTML entities
    unescaped twice, whitespace runs made one space, the ends stripped."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    text = html.unescape(html.unescape(ftfy.fix_text(text) if ftfy else text))
    return re.sub(r"\s+", " ", text).strip()


class WanTokenizer:
    """UMT5's tokenizer as diffusers' Wan pipelines call it: each prompt cleaned (`clean_prompt`), then T5's ids
    padded to `max_length` (their max_sequence_length, 512) with the attention mask. (jaxdiff's Wan folders on a
    trained T5 wrap their WordTokenizer so.)"""

    def __init__(self, tokenizer: T5Tokenizer | WordTokenizer, max_length: int = T5_DEFAULT_MAX_LENGTH):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (input_ids, attention_mask), each [B, max_length] int32."""
        return self.tokenizer([clean_prompt(t) for t in _as_list(texts)], self.max_length, return_attention_mask=True)


def load_tokenizer(folder: str) -> CLIPTokenizer | T5Tokenizer | WordTokenizer:
    """The tokenizer stored in `folder` (or its `tokenizer/` subfolder): a WordTokenizer when
    `word_tokenizer.json` is there (jaxdiff's own caption-vocabulary models), T5's when its
    tokenizer.json holds a unigram model, else CLIP's BPE."""
    for candidate in (folder, os.path.join(folder, "tokenizer")):
        if os.path.isfile(os.path.join(candidate, WORD_TOKENIZER_FILE)):
            return WordTokenizer.load(candidate)
    if _t5_tokenizer_folder(folder) is not None:
        return T5Tokenizer.from_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
