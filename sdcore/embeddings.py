"""Textual inversion: learned token embeddings added to the tokenizer and the text encoder's token table.

Files: A1111 `.pt` (`{"string_to_param": {"*": [N, D]}, ...}`) and `.safetensors` (`{"emb_params": [N, D]}`),
diffusers `learned_embeds.bin` / `.safetensors` (`{token: [D] or [N, D]}`). The token is the one declared,
whatever the file calls it. As in diffusers' `load_textual_inversion`, a token of N vectors adds the
tokens `tok`, `tok_1`, ... `tok_{N-1}`, one table row each, and `tok` in a prompt stands for all N.
Unlike diffusers, which expands only where the prompt spells `tok` exactly as declared, every spelling the
tokenizer matches (`TOK`, say) expands.
"""
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from sdcore.errors import EmbeddingError, WeightsError
from sdcore.tokenizer import AddedTokens, normalize
from sdcore.weights import read_torch_file


@dataclass
class Embedding:
    token: str
    vectors: torch.Tensor  # [N, D] float32
    sha256: str  # of the file's bytes

    @property
    def tokens(self) -> list[str]:
        """The tokenizer tokens it adds, one per vector."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]


def read_embedding(path: str | Path, token: str) -> Embedding:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EmbeddingError(f"embedding {token!r}: cannot read {path}: {e.strerror or e}") from None
    if path.suffix == ".safetensors":
        try:
            content = safetensors.torch.load(data)
        except Exception as e:  # safetensors raises its own error types, and ValueError/OSError
            raise EmbeddingError(f"embedding {token!r}: {path} is not a readable safetensors file ({e})") from None
    else:
        try:
            content = read_torch_file(path)
        except WeightsError as e:
            raise EmbeddingError(f"embedding {token!r}: {e}") from None
    vectors = _vectors(content)
    if vectors is None:
        raise EmbeddingError(
            f"embedding {token!r}: {path} holds no textual-inversion embedding: expected A1111's `string_to_param` "
            "or `emb_params`, or diffusers' single {token: tensor}")
    if not vectors.is_floating_point() or vectors.ndim not in (1, 2) or vectors.numel() == 0:
        raise EmbeddingError(f"embedding {token!r}: {path} holds a {vectors.dtype} tensor of shape {list(vectors.shape)}, "
                             "expected floating-point vectors [N, width] or one vector [width]")
    return Embedding(token, vectors.reshape(-1, vectors.shape[-1]).float(), hashlib.sha256(data).hexdigest())


def _vectors(content: object) -> torch.Tensor | None:
    if isinstance(content, torch.Tensor):
        return content
    if not isinstance(content, dict):
        return None
    if isinstance(content.get("string_to_param"), dict):  # A1111 .pt
        return content["string_to_param"].get("*")
    if "emb_params" in content:  # A1111 .safetensors
        return content["emb_params"]
    if len(content) == 1:  # diffusers: {its token: vectors}
        return next(iter(content.values()))
    return None


def embedding_problems(pipe, embedding: Embedding, others: Sequence[Embedding] = ()) -> list[str]:
    """What keeps `embedding` from being added to `pipe` beside `others` (declared before it); [] = fits."""
    problems = []
    width = pipe.text_encoder.embeddings.token_embedding.embedding_dim
    if embedding.vectors.shape[1] != width:
        problems.append(f"embedding {embedding.token!r} has vectors of width {embedding.vectors.shape[1]}, "
                        f"the text encoder's are {width} (made for another model?)")
    if not embedding.token or any(c.isspace() for c in embedding.token):
        problems.append(f"embedding token {embedding.token!r} must be one word: no spaces")
    # Tokens the tokenizer cannot tell apart (it matches them lower-cased) count as the same.
    taken = {normalize(t): f"is declared twice (also by embedding {e.token!r})" for e in others for t in e.tokens}
    taken |= {normalize(t): "was already added to this pipeline" for t in pipe.tokenizer.added}
    for token in embedding.tokens:
        if token in pipe.tokenizer.vocab:
            problems.append(f"embedding token {token!r} is already in the tokenizer's vocabulary; declare another name")
        elif normalize(token) in taken:
            problems.append(f"embedding token {token!r} {taken[normalize(token)]}")
    return problems


@torch.no_grad()
def add_embeddings(pipe, embeddings: Sequence[Embedding]) -> None:
    """Teach `pipe` the embeddings' tokens: new rows at the end of the text encoder's token table and a
    tokenizer that knows them. Call before encoding any prompt (prepared encodings do not see them).
    Prompts without the tokens encode as before. Raises EmbeddingError naming every problem."""
    problems = [p for i, e in enumerate(embeddings) for p in embedding_problems(pipe, e, embeddings[:i])]
    if problems:
        raise EmbeddingError("; ".join(problems))
    if not embeddings:
        return
    table = pipe.text_encoder.embeddings.token_embedding
    first_id = table.num_embeddings
    weight = torch.cat([table.weight, *(e.vectors.to(table.weight) for e in embeddings)])  # [V + new, D]
    pipe.text_encoder.embeddings.token_embedding = nn.Embedding(*weight.shape, _weight=weight, _freeze=True)
    added, next_id = {}, first_id
    for e in embeddings:
        ids = list(range(next_id, next_id + len(e.vectors)))
        added[e.token] = ids  # the whole embedding where a prompt names it
        added |= {token: [i] for token, i in zip(e.tokens[1:], ids[1:])}  # as diffusers' tokenizer knows them
        next_id += len(ids)
    pipe.tokenizer = pipe.tokenizer.with_added_tokens(added)


def tokens_in(prompt: str, embeddings: Sequence[Embedding]) -> list[str]:
    """The declared tokens that `prompt` uses, in the order of `embeddings` (for an image's metadata)."""
    found = AddedTokens({t: e.token for e in embeddings for t in e.tokens})
    used = {token for _, token in found.split(normalize(prompt))}
    return [e.token for e in embeddings if e.token in used]
