"""Textual inversion (sdcore.embeddings) against diffusers' load_textual_inversion on the same random weights."""
import hashlib
import random

import numpy as np
import pytest
import safetensors.torch
import torch

import sdcore
from sdcore.embeddings import Embedding, add_embeddings, embedding_problems, read_embedding, tokens_in
from sdcore.errors import EmbeddingError
from sdcore.tokenizer import Tokenizer
from tests.reference import reference_pipeline
from tests.test_pipeline import tiny_folder  # noqa: F401  (a fixture)
from tests.test_tokenizer import CASES, assert_same_rows, random_prompts, reference_ids, vocab_dir  # noqa: F401

WIDTH = 64  # tests.reference.TINY_CLIP's hidden size


def write_embedding(path, layout: str, vectors: torch.Tensor):
    """`vectors` [N, D] saved as `layout` lays them out; a diffusers file of one vector holds it as [D]."""
    if layout == "a1111.pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "trained-name",
                    "step": 3000, "sd_checkpoint": "cafe01", "sd_checkpoint_name": "v1-5"}, path)
    elif layout == "a1111.safetensors":
        safetensors.torch.save_file({"emb_params": vectors}, path)
    elif layout == "diffusers.bin":
        torch.save({"<trained>": vectors[0] if len(vectors) == 1 else vectors}, path)
    else:
        safetensors.torch.save_file({"<trained>": vectors[0] if len(vectors) == 1 else vectors}, path)
    return path


SUFFIX = {"a1111.pt": ".pt", "a1111.safetensors": ".safetensors", "diffusers.bin": ".bin", "diffusers.safetensors": ".safetensors"}
# token -> (file layout, vectors): every layout, single- and multi-vector
DECLARED = {"<cat-toy>": ("a1111.pt", 3), "sks": ("a1111.safetensors", 1), "<style>": ("diffusers.bin", 1),
            "zkw": ("diffusers.safetensors", 2)}
PROMPTS = ["a <cat-toy> on a mat", "sks, in the style of <style>", "zkw", "<style>!,<cat-toy>...zkw's", "a plain prompt", ""]


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    folder, gen = tmp_path_factory.mktemp("embeddings"), torch.Generator().manual_seed(11)
    return {token: write_embedding(folder / f"{layout}{SUFFIX[layout]}", layout, torch.randn(n, WIDTH, generator=gen))
            for token, (layout, n) in DECLARED.items()}


@pytest.fixture(scope="module")
def embeddings(embedding_files):
    return [read_embedding(path, token) for token, path in embedding_files.items()]


@pytest.fixture(scope="module")
def pipes(tiny_folder, embedding_files, embeddings):  # noqa: F811
    """sdcore's and diffusers' pipelines over the tiny model, each with every embedding added its own way."""
    ours = sdcore.load_pipeline(str(tiny_folder))
    plain = ours.encode_prompts(PROMPTS[-2:])
    add_embeddings(ours, embeddings)
    theirs = reference_pipeline(tiny_folder, "euler_a")
    for token, path in embedding_files.items():
        theirs.load_textual_inversion(str(path), token=token)
    return ours, theirs, plain


@pytest.mark.parametrize("layout", SUFFIX)
@pytest.mark.parametrize("n", [1, 4])
def test_reads_every_layout(tmp_path, layout, n):
    vectors = torch.randn(n, WIDTH, dtype=torch.float16).float()
    path = write_embedding(tmp_path / f"emb{SUFFIX[layout]}", layout, vectors.half())
    embedding = read_embedding(path, "<mine>")
    assert embedding.token == "<mine>" and embedding.vectors.dtype == torch.float32
    assert torch.equal(embedding.vectors, vectors)
    assert embedding.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert embedding.tokens == ["<mine>"] + [f"<mine>_{i}" for i in range(1, n)]


def test_token_ids_equal_transformers_after_it_adds_the_tokens(vocab_dir):  # noqa: F811
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
    from transformers import CLIPTokenizer

    oracle = CLIPTokenizer.from_pretrained(str(vocab_dir), local_files_only=True, model_max_length=77)
    vectors = {"<cat-toy>": 1, "Sks": 1, "zkw": 1, "<style>": 3, "x-y": 2}
    added, next_id = {}, len(oracle)
    for token, n in vectors.items():
        names = [token] + [f"{token}_{i}" for i in range(1, n)]
        oracle.add_tokens(names)
        added[token] = list(range(next_id, next_id + n))
        added |= {name: [next_id + i] for i, name in enumerate(names[1:], 1)}
        next_id += n
    tok = Tokenizer.default().with_added_tokens(added)
    assert Tokenizer.default().added == {} and all(tok.vocab[t] == oracle.convert_tokens_to_ids(t) for t in ["cat</w>", "a"])

    # Single-vector tokens in any case, anywhere, among random text: no prompt rewriting is involved.
    rng = random.Random(3)
    singles = ["<cat-toy>", "<CAT-Toy>", "sks", "Sks", "SKS", "zkw", "ZKW"]
    prompts = [*CASES, *(p[:k] + rng.choice(singles) + p[k:] for p in random_prompts(300, 4) for k in [rng.randint(0, len(p))])]
    assert_same_rows(tok(prompts), reference_ids(oracle, prompts), prompts)
    # Multi-vector tokens stand for all their vectors, as after diffusers' maybe_convert_prompt.
    prompts = ["<style>", "a <style>, b", "<style><style>!", "x-y<cat-toy>x-y", "zkw<style>zkw", "<style>_1 <style>_2", "a x-y b",
               "<style> " * 30]
    expanded = TextualInversionLoaderMixin().maybe_convert_prompt(prompts, oracle)
    assert_same_rows(tok(prompts), reference_ids(oracle, expanded), prompts)
    # Where diffusers expands only the spelling declared, we expand every spelling the tokenizer matches.
    assert tok(["A <STYLE>"]).tolist() == tok(["a <style>"]).tolist()


def test_prompt_encodings_equal_diffusers(pipes):
    ours, theirs, plain = pipes
    assert torch.equal(ours.encode_prompts(PROMPTS[-2:]), plain)  # prompts without the tokens: bit for bit as before
    for prompt in PROMPTS:
        want = theirs.encode_prompt(prompt, "cpu", 1, False)[0][0]
        torch.testing.assert_close(ours.encode_prompts([prompt])[0], want, rtol=0, atol=1e-5)
        assert not torch.equal(want, theirs.encode_prompt("a", "cpu", 1, False)[0][0])


def test_images_equal_diffusers(pipes):
    ours, theirs, _ = pipes
    for prompt, negative, seed in [("<style>!,<cat-toy>...zkw's", "blurry sks", 3), ("a <cat-toy> on a mat", None, 4)]:
        got = ours.generate([prompt], seeds=[seed], negative_prompts=None if negative is None else [negative], steps=3,
                            guidance_scale=7.5, height=64, width=40, scheduler="euler_a", output="np")[0]
        want = theirs(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=7.5, height=64, width=40,
                      generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
        assert np.abs(got.astype(int) - (want * 255).round().astype(int)).max() <= 2, prompt


def test_tokens_in(embeddings):
    assert tokens_in("<STYLE>!,<cat-toy>...zkw's", embeddings) == ["<cat-toy>", "<style>", "zkw"]
    assert tokens_in("zkw_1 only", embeddings) == ["zkw"]
    assert tokens_in("a cat in the sky", embeddings) == []


def test_problems_are_named_and_nothing_is_added(tiny_folder, embeddings):  # noqa: F811
    pipe = sdcore.load_pipeline(str(tiny_folder))
    table, tokenizer = pipe.text_encoder.embeddings.token_embedding, pipe.tokenizer
    assert embedding_problems(pipe, embeddings[0], embeddings[1:]) == []
    cases = [
        (Embedding("<wide>", torch.zeros(2, 768), ""), [], "width 768, the text encoder's are 64"),
        (Embedding("cat", torch.zeros(1, WIDTH), ""), [], "'cat' is already in the tokenizer's vocabulary"),
        (Embedding("two words", torch.zeros(1, WIDTH), ""), [], "no spaces"),
        (Embedding("<CAT-TOY>", torch.zeros(1, WIDTH), ""), embeddings, "'<CAT-TOY>' is declared twice"),
        (Embedding("zk", torch.zeros(2, WIDTH), ""), [Embedding("zk_1", torch.zeros(1, WIDTH), "")], "'zk_1' is declared twice"),
    ]
    for embedding, others, message in cases:
        [problem] = embedding_problems(pipe, embedding, others)
        assert message in problem
        with pytest.raises(EmbeddingError, match=message):
            add_embeddings(pipe, [*others, embedding])
        assert pipe.text_encoder.embeddings.token_embedding is table and pipe.tokenizer is tokenizer
    add_embeddings(pipe, embeddings[:1])
    with pytest.raises(EmbeddingError, match="already added to this pipeline"):
        add_embeddings(pipe, embeddings[:1])


class WritesAFile:
    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("name, content, message", [
    ("missing.pt", None, "cannot read"),
    ("garbage.pt", b"not a pickle at all", "not a readable PyTorch checkpoint"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "not a readable safetensors file"),
    ("two.safetensors", {"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, "holds no textual-inversion embedding"),
    ("ints.bin", {"<t>": torch.zeros(2, 4, dtype=torch.int64)}, "expected floating-point vectors"),
    ("cube.bin", {"<t>": torch.zeros(2, 3, 4)}, "shape \\[2, 3, 4\\]"),
    ("code.pt", "pickle", "does not unpickle"),
])
def test_bad_files_are_refused(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickle":  # a pickle that would create a file if loaded without weights_only
        code = WritesAFile()
        code.marker = str(tmp_path / "ran")
        torch.save({"string_to_param": {"*": code}}, path)
    elif content is not None:
        (safetensors.torch.save_file if name.endswith(".safetensors") else torch.save)(content, path)
    with pytest.raises(EmbeddingError, match=message):
        read_embedding(path, "<t>")
    assert not (tmp_path / "ran").exists()


@pytest.mark.full_size
def test_full_size_prompt_encodings_and_image_equal_diffusers(full_sd15_folder, tmp_path):
    gen = torch.Generator().manual_seed(5)
    paths = {"<cat-toy>": write_embedding(tmp_path / "ct.pt", "a1111.pt", 0.02 * torch.randn(3, 768, generator=gen)),
             "sks": write_embedding(tmp_path / "sks.safetensors", "diffusers.safetensors", 0.02 * torch.randn(1, 768, generator=gen))}
    ours = sdcore.load_pipeline(str(full_sd15_folder))
    add_embeddings(ours, [read_embedding(path, token) for token, path in paths.items()])
    theirs = reference_pipeline(full_sd15_folder, "ddim")
    for token, path in paths.items():
        theirs.load_textual_inversion(str(path), token=token)
    for prompt in ["a <cat-toy> on a mat, sks", "a plain prompt"]:
        torch.testing.assert_close(ours.encode_prompts([prompt])[0], theirs.encode_prompt(prompt, "cpu", 1, False)[0][0],
                                   rtol=0, atol=1e-4)
    prompt = "sks, <cat-toy>!"
    got = ours.generate([prompt], seeds=[1], steps=1, height=64, width=64, scheduler="ddim", output="np")[0]
    want = theirs(prompt, num_inference_steps=1, height=64, width=64, generator=torch.Generator("cpu").manual_seed(1),
                  output_type="np").images[0]
    assert np.abs(got.astype(int) - (want * 255).round().astype(int)).max() <= 2
