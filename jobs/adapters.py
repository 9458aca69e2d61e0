"""A job's adapters: LoRAs (`--lora NAME=SRC`) and textual-inversion embeddings (`--embedding TOKEN=SRC`).

Adapters are declared once per job; rows refer to LoRAs by name in their `loras` cell, either a
list of {name, scale} structs or a string "name:0.8,other:0.5" (a name alone has scale 1.0; an
empty or null cell: no LoRA). A row's LoRA set is a tuple of (name, scale) sorted by name, the
form the batch key and the metadata use. Embeddings need no reference: a prompt that holds a
declared token uses it.

Each source is a local path, an fsspec URI or a Hub id, checked and resolved by jobs.sources like
the model; a job's identity records each file's sha256.
"""
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from jobs import sources, storage
from sdcore import embeddings, lora
from sdcore.errors import EmbeddingError, LoRAError

LoRASet = tuple[tuple[str, float], ...]


class AdapterError(ValueError):
    """A declaration or a `loras` value that cannot be used: bad input."""


def parse_declarations(values: Iterable[str] | None, option: str) -> dict[str, str]:
    """`--lora NAME=SRC` (or `--embedding TOKEN=SRC`), repeated -> {name: source}, in the given order."""
    declared: dict[str, str] = {}
    for value in values or ():
        name, sep, source = value.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise AdapterError(f"{option} {value!r}: expected NAME=PATH_OR_URI")
        if option == "--lora" and any(c in name for c in ":,"):
            raise AdapterError(f"{option} {value!r}: a LoRA name may not hold ':' or ','; rows write name:scale,...")
        if name in declared:
            raise AdapterError(f"{option} {name}: declared twice ({declared[name]} and {source})")
        declared[name] = source
    return declared


def parse_loras(text: str) -> LoRASet:
    """"name:0.8,other:0.5" -> (("name", 0.8), ("other", 0.5)); a name alone has scale 1.0."""
    pairs = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, scale = part.partition(":")
        try:
            value = float(scale) if sep else 1.0
        except ValueError:
            raise AdapterError(f"{part.strip()!r}: the scale {scale.strip()!r} is not a number") from None
        pairs.append((name.strip(), value))
    return lora_set(pairs)


def lora_set(value: str | list | None) -> LoRASet:
    """A `loras` cell (string, list of {name, scale} structs or pairs, or null) as a sorted LoRA set."""
    if value is None:
        return ()
    if isinstance(value, str):
        return parse_loras(value)
    pairs = [(p.get("name"), 1.0 if p.get("scale") is None else p.get("scale")) if isinstance(p, dict) else tuple(p)
             for p in value]
    for name, scale in pairs:
        if not isinstance(name, str) or not name.strip():
            raise AdapterError("a LoRA without a name")
        if not math.isfinite(scale):
            raise AdapterError(f"{name}: the scale {scale} is not a finite number")
    names = [name.strip() for name, _ in pairs]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise AdapterError(f"{', '.join(twice)} named more than once")
    return tuple(sorted(zip(names, (float(scale) for _, scale in pairs))))


def tokens_used(prompt: str, negative_prompt: str, declared: list) -> tuple[str, ...]:
    """The declared embeddings' tokens (sdcore.embeddings.Embedding) that a prompt or its negative prompt
    uses, in the order declared: what an image's metadata records in `embeddings`."""
    used = {token for text in (prompt, negative_prompt) for token in embeddings.tokens_in(text, declared)}
    return tuple(e.token for e in declared if e.token in used)


def format_loras(loras: LoRASet) -> str:
    """The string form of a LoRA set (`parse_loras`' inverse)."""
    return ",".join(f"{name}:{scale:g}" for name, scale in loras)


def is_loras_type(t: pa.DataType) -> bool:
    """Whether a `loras` column of type `t` holds strings or lists of {name, scale} structs."""
    if pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return "name" in fields and set(fields) <= {"name", "scale"} and (
        "scale" not in fields or pa.types.is_integer(fields["scale"]) or pa.types.is_floating(fields["scale"]))


@dataclass(frozen=True)
class Adapters:
    """The adapters a job declares: {name: source} for LoRAs, {token: source} for embeddings."""

    loras: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, lora: list[str] | None, embedding: list[str] | None) -> "Adapters":
        """From the command line's repeated --lora and --embedding."""
        return cls(parse_declarations(lora, "--lora"), parse_declarations(embedding, "--embedding"))

    def problems(self, storage_options: dict | None = None, cache: str | None = None) -> list[str]:
        """Each declared file that is missing or not a weight file (listed, not downloaded)."""
        problems = []
        for declared, layout in ((self.loras, sources.LORA), (self.embeddings, sources.EMBEDDING)):
            for name, source in declared.items():
                try:
                    sources.check(source, storage_options, cache=cache, layout=layout)
                except (sources.SourceError, storage.StorageError, PermissionError) as e:
                    problems.append(f"{layout.option} {name}: {str(e).removeprefix(layout.option + ' ')}")
        return problems

    def resolve(self, storage_options: dict | None = None, cache: str | None = None) -> "ResolvedAdapters":
        """Every declared file as a local path on this node, with its sha256."""
        def local(declared: dict[str, str], layout: sources.Layout) -> dict[str, tuple[str, str]]:
            paths = {name: sources.resolve(source, storage_options=storage_options, cache=cache, layout=layout).path
                     for name, source in declared.items()}
            return {name: (path, sources.file_sha256(path)) for name, path in paths.items()}

        return ResolvedAdapters(local(self.loras, sources.LORA), local(self.embeddings, sources.EMBEDDING))

    def settings(self) -> dict:
        """The sources as job.json's settings record them (credentials in URIs redacted)."""
        return {"loras": {n: storage.redact_url(s) for n, s in self.loras.items()},
                "embeddings": {t: storage.redact_url(s) for t, s in self.embeddings.items()}}


@dataclass(frozen=True)
class ResolvedAdapters:
    """On an actor: {name: (local path, sha256 of the file)} for LoRAs and for embeddings."""

    loras: dict[str, tuple[str, str]] = field(default_factory=dict)
    embeddings: dict[str, tuple[str, str]] = field(default_factory=dict)

    def load(self, pipe, model: str) -> tuple[dict, list]:
        """The LoRAs read (sdcore.lora.LoRA by name) and the embeddings read and added to `pipe` (a list of
        sdcore.embeddings.Embedding). One that does not fit the model raises, naming what does not fit: on an
        actor, that stops the job before any shard."""
        loras = {}
        for name, (path, _) in self.loras.items():
            adapter = lora.read_lora(path, name)
            if misfits := lora.lora_problems(pipe, adapter):
                raise LoRAError(f"--lora {name}: {len(misfits)} of its {len(adapter.layers)} layers do not fit "
                                f"{model}; the first: {', '.join(misfits[:5])}")
            loras[name] = adapter
        tokens = []
        for token, (path, _) in self.embeddings.items():
            embedding = embeddings.read_embedding(path, token)
            if problems := embeddings.embedding_problems(pipe, embedding, tokens):
                raise EmbeddingError(f"--embedding {token} does not fit {model}: {'; '.join(problems)}")
            tokens.append(embedding)
        if tokens:
            embeddings.add_embeddings(pipe, tokens)
        return loras, tokens

    def fingerprints(self) -> dict:
        """What job.json's identity records: {"loras": {name: sha256}, "embeddings": {token: sha256}}."""
        return {"loras": {n: sha for n, (_, sha) in sorted(self.loras.items())},
                "embeddings": {t: sha for t, (_, sha) in sorted(self.embeddings.items())}}
