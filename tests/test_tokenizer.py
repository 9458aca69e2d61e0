"""sdcore.tokenizer against transformers' CLIPTokenizer built from the same vocabulary.

In transformers 5 `CLIPTokenizer` is the `tokenizers` (Rust) backend; there is no slow Python
class any more, and that backend is what SD pipelines run, so it is the oracle.
"""
import hashlib
import random
import time
import unicodedata
from importlib import resources

import pytest
import torch

from reference import write_clip_vocab_folder
from sdcore.tokenizer import Tokenizer

CASES = [
    "a photo of an astronaut riding a horse on mars",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n\n  mixed \x0b\x0c spaces",
    "MiXeD CaSe WoRdS, ALL CAPS",
    "don't it's they're we've I'm you'll he'd",
    "DON'T IT'S THEY'RE",
    "'s 't 're 've 'm 'll 'd",
    "rock'n'roll o'clock's ''quoted'' 'sa 'rex",
    "l'été c’est curly’s apostrophe",
    "1234567890 3.14159 1,000,000 v2.0-beta x1y2z3 2nd 3rd 4th 1920x1080",
    "½ ² ① ٣ 五 Ⅻ ⁴",
    "!!!???... --==**## ~~~ ```",
    "hello!!! world??? (parenthesis) [brackets] {braces} <angles>",
    "a/b\\c|d e-mail@example.com https://example.com/path?q=1&x=2",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39; <b>html</b>",
    "café naïve résumé façade Ångström Straße ß ﬁ ligature",
    "cafe\u0301 combining acute, e\u0308\u0301 two marks",
    "日本語のテキスト、中文提示词，高质量",
    "한국어 문장",
    "Привет, мир! ПРИВЕТ ёжик",
    "مرحبا بالعالم",
    "שלום עולם",
    "ΟΔΟΣ Σίσυφος ΣΑΣ σς",
    "İstanbul ıi IJ ǅ",
    "हिन्दी ไทย ქართული",
    "emoji 🙂🙂🙂",
    "👍🏽 skin tone, 👨‍👩‍👧‍👦 family zwj, ❤️ variation selector, 🇫🇷🇯🇵 flags",
    "zero\u200bwidth\u200djoiner",
    "nbsp\u00a0ideographic\u3000line\u2028para\u2029nel\x85space",
    "control\x00chars\x01\x7f\x1c\x1f",
    "<|endoftext|>",
    "a<|startoftext|>b<|endoftext|>c",
    "<|ENDOFTEXT|> <|endoftext <|startoftext|",
    "masterpiece, best quality, (ultra detailed:1.2), [bad hands], 8k uhd, dslr, ((woman))",
    "word " * 100,
    "supercalifragilisticexpialidocious" * 5,
    "a" * 300,
    "🙂" * 100,
    "1" * 200,
    "a " * 75,  # exactly fills the 75 free positions
    "a " * 76,  # one too many
]

ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("     \t\n'''\"!?.,;:-_()[]{}<>|/\\@#$%^&*+=~`")
    + list("éèàüöñçÅØßæœÉÜΣσςΟΔλİıЖжщЯё中文日本語한국어العربيةשלוםไทย")
    + ["🙂", "👍🏽", "👨‍👩‍👧", "❤️", "🇫🇷", "\u200b", "\u200d", "\u0301", "\u00a0", "\u3000", "ﬁ", "①", "²", "½", "٣"]
)
FRAGMENTS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "<|endoftext|>", "<|startoftext|>",
             "&amp;", "photo", "Cat", "astronaut", "unbelievable", "  ", "1080p"]


def random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) if rng.random() < 0.8 else rng.choice(FRAGMENTS)
                    for _ in range(rng.randint(0, 80))) for _ in range(n)]


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    return write_clip_vocab_folder(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def oracle(vocab_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(vocab_dir), local_files_only=True, model_max_length=77)


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.default()


def reference_ids(oracle, prompts: list[str]) -> torch.Tensor:
    return oracle(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]


def assert_same_rows(got: torch.Tensor, want: torch.Tensor, prompts: list[str]):
    bad = [i for i in range(len(prompts)) if not torch.equal(got[i], want[i])]
    assert not bad, "\n".join(f"{prompts[i]!r}\n  ours {got[i].tolist()}\n  ref  {want[i].tolist()}" for i in bad[:5])


def test_oracle_is_the_full_clip_vocabulary(oracle):
    assert len(oracle) == 49408
    assert oracle("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("text", CASES, ids=lambda s: repr(s)[:40])
def test_matches_reference(tok, oracle, text):
    assert tok([text]).tolist() == reference_ids(oracle, [text]).tolist()
    # without specials or truncation, so the tail of long prompts is checked too
    assert tok.encode(text) == oracle(text, add_special_tokens=False)["input_ids"]


def test_random_strings_match_reference(tok, oracle):
    prompts = random_prompts(1000, seed=0)
    assert_same_rows(tok(prompts), reference_ids(oracle, prompts), prompts)


def test_every_assigned_code_point_matches_reference(tok, oracle):
    # Runs of 24 consecutive assigned code points (as Python's unicodedata knows them), as they are
    # and upper-cased. The input is NFC already: the reference's normaliser has Unicode 10 tables
    # and would leave marks added since then in their written order where ours sorts them.
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    runs = ["".join(chars[i : i + 24]) for i in range(0, len(chars), 24)]
    prompts = [unicodedata.normalize("NFC", f"x{run} {run.upper()}") for run in runs]
    want = oracle(prompts, add_special_tokens=False)["input_ids"]
    bad = [p for p, w in zip(prompts, want) if tok.encode(p) != w]
    assert not bad, f"{len(bad)} runs differ, first {bad[0]!r}"


def test_from_files_equals_default(tok, vocab_dir):
    from_files = Tokenizer.from_files(vocab_dir / "vocab.json", vocab_dir / "merges.txt")
    assert from_files.vocab == tok.vocab
    assert from_files.ranks == tok.ranks
    prompts = CASES + random_prompts(200, seed=1)
    assert torch.equal(from_files(prompts), tok(prompts))


def test_default_is_bundled_and_cached(tok):
    assert Tokenizer.default() is tok
    assets = resources.files("sdcore") / "assets"
    assert (assets / "bpe_simple_vocab_16e6.txt.gz").is_file()
    assert (assets / "LICENSE-clip-bpe").is_file()
    # OpenAI's published file, byte for byte
    digest = hashlib.sha256((assets / "bpe_simple_vocab_16e6.txt.gz").read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_special_tokens(tok):
    assert (tok.bos_id, tok.eos_id, tok.max_length) == (49406, 49407, 77)
    assert len(tok.vocab) == 49408
    assert tok.encode("") == []
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok([""]).tolist() == [[49406] + [49407] * 76]


def test_padding_and_truncation(tok):
    ids = tok(["a cat", "word " * 200, "a " * 75, "a " * 76])
    assert ids.dtype == torch.long and ids.shape == (4, 77)
    assert (ids[:, 0] == tok.bos_id).all() and (ids[:, 76] == tok.eos_id).all()
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and (ids[0, 3:] == 49407).all()
    assert ids[1, 1:76].tolist() == tok.encode("word " * 200)[:75]
    assert ids[2].tolist() == ids[3].tolist() == [49406] + [320] * 75 + [49407]
    assert tok([]).shape == (0, 77)


def test_bare_string_is_refused(tok):
    with pytest.raises(TypeError):
        tok("a photo of a cat")


def test_speed(vocab_dir):
    fresh = Tokenizer.from_files(vocab_dir / "vocab.json", vocab_dir / "merges.txt")  # cold word cache
    rng = random.Random(2)
    words = ("a photo of an astronaut riding a horse on mars highly detailed 8k trending on artstation "
             "portrait oil painting by greg rutkowski cyberpunk city at night neon lights").split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(3, 30))) + f", seed {i}" for i in range(10_000)]
    start = time.perf_counter()
    fresh(prompts)
    assert time.perf_counter() - start < 3.0


def test_a_50_mb_prompt_costs_what_its_first_tokens_do():
    tok = Tokenizer.default()
    head = "A Cat  in the <|endoftext|>rain, Ünïcode ΣΑΣ 123 " * 20
    huge = head + "lorem ipsum dolor " * 2_800_000  # about 50 MB
    start = time.perf_counter()
    ids = tok([huge])
    assert time.perf_counter() - start < 0.05
    assert torch.equal(ids, tok([head]))
    assert tok.encode(head, 75) == tok.encode(head)[:75]
