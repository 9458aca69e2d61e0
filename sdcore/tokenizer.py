"""CLIP's byte-level BPE tokenizer, written from the published vocabulary.

Behaviour matches transformers' `CLIPTokenizer` (the `tokenizers` backend that SD pipelines use),
which differs slightly from OpenAI's original: no ftfy / html unescaping, NFC normalisation,
lower-casing char by char, and `<|startoftext|>` / `<|endoftext|>` recognised in the raw text only
when written exactly so.

Unicode tables are Python's (`unicodedata`, `regex`), so the ids differ from the reference only on
characters that its older or newer tables see differently: combining marks and compositions added
since Unicode 10 (its NFC leaves them as written, ours reorders or composes them), and code points
assigned in Unicode 16 or later (letter classes, lower-casing). Real prompts practically never
hold either.
"""
import functools
import gzip
import json
import unicodedata
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import regex
import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_END = "</w>"
WHITESPACE = regex.compile(r"\s+")
# Runs of non-space text, specials apart (the reference splits those out of the raw text before
# any normalisation): normalising and splitting runs one at a time gives what doing it to the
# whole text does (neither crosses whitespace), so encoding can stop early.
PIECES = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|(?:(?!<\|startoftext\|>|<\|endoftext\|>)\S)+")
# CLIP's pre-tokenisation: contractions, letter runs, single digits, runs of anything else
WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
N_MERGES = 49152 - 256 - 2  # the vocabulary size CLIP was trained with fixes how many merges are used
CACHE_LIMIT = 200_000  # words; bounds memory in a long-running job that sees many unique prompts


def bytes_to_unicode() -> dict[int, str]:
    """A reversible byte -> printable character table, so BPE symbols are plain strings.

    Bytes that are already visible characters stand for themselves; the rest (controls, space,
    a few Latin-1 oddities) are moved to code points from 256 up, in byte order.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in visible}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(visible))
    return table


BYTE_CHARS = bytes_to_unicode()
# maps a UTF-8 string read as Latin-1 (one char per byte) onto the byte symbols in one C call
BYTE_TABLE = str.maketrans({chr(b): c for b, c in BYTE_CHARS.items()})


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = WHITESPACE.sub(" ", text)
    # The reference lower-cases each character alone: a capital sigma always becomes "σ", never the
    # word-final "ς" that str.lower() would pick.
    return text.replace("Σ", "σ").lower()


class AddedTokens:
    """Tokens added after training (textual inversion), found in a text as transformers finds tokens added
    to CLIPTokenizer: in the normalised text (so in any case), anywhere, inside words too, leftmost first
    and of those the longest; the text between two of them is split into words on its own."""

    def __init__(self, values: dict[str, object]):  # token as declared (no whitespace) -> what it stands for
        self.values = {normalize(token): value for token, value in values.items()}
        longest_first = sorted(self.values, key=len, reverse=True)
        self.pattern = regex.compile("|".join(map(regex.escape, longest_first))) if values else None

    def split(self, normalized: str) -> Iterator[tuple[str, object]]:
        """(text before a token, the token's value) for each token in `normalized`, then (the rest, None)."""
        start = 0
        for match in self.pattern.finditer(normalized) if self.pattern else ():
            yield normalized[start : match.start()], self.values[match.group()]
            start = match.end()
        yield normalized[start:], None


class Tokenizer:
    max_length = 77

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[str, list[int]] | None = None):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.merges = merges
        self.bos_id = vocab[BOS]
        self.eos_id = vocab[EOS]
        self.added = dict(added or {})  # token as declared -> the ids it stands for
        self._added_tokens = AddedTokens(self.added)
        self._cache: dict[str, list[int]] = {}

    def with_added_tokens(self, added: dict[str, list[int]]) -> "Tokenizer":
        """A tokenizer that also knows `added` (token -> the ids it stands for), leaving this one as it is:
        `Tokenizer.default()` is shared by every pipeline of the process."""
        return Tokenizer(self.vocab, self.merges, {**self.added, **added})

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> "Tokenizer":
        """A diffusers `tokenizer/` folder's `vocab.json` and `merges.txt`."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges)

    @classmethod
    @functools.cache
    def default(cls) -> "Tokenizer":
        """OpenAI's CLIP vocabulary bundled with the package (loaded once per process)."""
        gz = resources.files("sdcore").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
        lines = gzip.decompress(gz).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
        symbols = list(BYTE_CHARS.values())
        symbols += [s + WORD_END for s in symbols]
        symbols += ["".join(pair) for pair in merges]
        symbols += [BOS, EOS]
        return cls({s: i for i, s in enumerate(symbols)}, merges)

    def bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenised word: its UTF-8 bytes, merged lowest-ranked pair first."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        symbols = word.encode("utf-8").decode("latin-1").translate(BYTE_TABLE)
        parts = [*symbols[:-1], symbols[-1] + WORD_END]
        while len(parts) > 1:
            pairs = zip(parts, parts[1:])
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        # a symbol missing from a custom vocabulary becomes the unknown token, <|endoftext|>, as in the reference
        ids = [self.vocab.get(p, self.eos_id) for p in parts]
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text`, without the start / end tokens; with `limit`, the first `limit`
        only, reading no more of the text than they need (a 50 MB prompt costs what a short one does)."""
        ids = []
        for piece in PIECES.finditer(text):
            piece = piece.group()
            if piece == BOS or piece == EOS:
                ids.append(self.vocab[piece])
            else:
                for text, token_ids in self._added_tokens.split(normalize(piece)):
                    for word in WORDS.findall(text):
                        ids += self.bpe(word)
                    ids += token_ids or []
            if limit is not None and len(ids) >= limit:
                return ids[:limit]
        return ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """[B, 77] ids: start token, the prompt (cut to fit), end token, then end tokens as padding."""
        if isinstance(prompts, str):
            raise TypeError("Tokenizer takes a list of prompts, not a single str")
        rows = []
        for text in prompts:
            ids = [self.bos_id, *self.encode(text, self.max_length - 2), self.eos_id]
            rows.append(ids + [self.eos_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)
