"""--lora/--embedding declarations, the `loras` cell's two forms, and finding and hashing adapter files."""
import hashlib

import pytest

from jobs.adapters import AdapterError, Adapters, format_loras, lora_set, parse_declarations, parse_loras


def test_a_loras_string_becomes_a_sorted_set_of_names_and_scales():
    assert parse_loras("owl:0.8, cat,dog:-0.5") == (("cat", 1.0), ("dog", -0.5), ("owl", 0.8))
    assert parse_loras("") == parse_loras(" , ") == lora_set(None) == ()
    assert format_loras(parse_loras("owl:0.8,cat")) == "cat:1,owl:0.8"


def test_a_list_of_structs_is_the_same_set_as_its_string():
    cell = [{"name": "owl", "scale": 0.8}, {"name": "cat", "scale": None}]
    assert lora_set(cell) == lora_set("cat,owl:0.8") == (("cat", 1.0), ("owl", 0.8))


@pytest.mark.parametrize("cell, message", [
    ("cat:big", "'cat:big': the scale 'big' is not a number"),
    ("cat:0.5,cat", "cat named more than once"),
    (":0.5", "a LoRA without a name"),
    ("cat:inf", "cat: the scale inf is not a finite number"),
    ([{"name": None, "scale": 1.0}], "a LoRA without a name"),
])
def test_malformed_loras_say_why(cell, message):
    with pytest.raises(AdapterError, match=message):
        lora_set(cell)


def test_declarations_are_name_equals_source_each_name_once():
    assert parse_declarations(["cat=a.safetensors", "owl = s3://b/owl.safetensors"], "--lora") == {
        "cat": "a.safetensors", "owl": "s3://b/owl.safetensors"}
    for bad, message in ((["cat"], "expected NAME=PATH_OR_URI"), (["=x"], "expected NAME=PATH_OR_URI"),
                         (["cat=a", "cat=b"], "--lora cat: declared twice \\(a and b\\)"),
                         (["c:t=a"], "may not hold ':' or ','")):
        with pytest.raises(AdapterError, match=message):
            parse_declarations(bad, "--lora")
    assert parse_declarations(["<c:t>=e.pt"], "--embedding") == {"<c:t>": "e.pt"}


def test_missing_or_wrong_files_are_problems_and_present_ones_resolve_with_their_sha256(tmp_path):
    lora, embedding = tmp_path / "cat.safetensors", tmp_path / "owl.pt"
    lora.write_bytes(b"lora bytes")
    embedding.write_bytes(b"embedding bytes")
    (tmp_path / "notes.txt").write_text("x")
    good = Adapters.of([f"cat={lora}"], [f"<owl>={embedding}"])
    assert good.problems() == []
    bad = Adapters.of([f"cat={tmp_path / 'gone.safetensors'}", f"txt={tmp_path / 'notes.txt'}"], [f"<d>={tmp_path}"])
    problems = bad.problems()
    assert problems[0] == f"--lora cat: {tmp_path / 'gone.safetensors'}: no such file or directory"
    assert problems[1].startswith(f"--lora txt: {tmp_path / 'notes.txt'}: expected a LoRA .safetensors")
    assert problems[2].startswith(f"--embedding <d>: {tmp_path}: a folder; expected an embedding")
    (tmp_path / "cat.pt").write_bytes(b"pickled lora")  # sdcore.lora reads safetensors only
    assert Adapters.of([f"pt={tmp_path / 'cat.pt'}"], None).problems()[0].startswith(
        f"--lora pt: {tmp_path / 'cat.pt'}: expected a LoRA .safetensors file")
    resolved = good.resolve()
    assert resolved.loras == {"cat": (str(lora), hashlib.sha256(b"lora bytes").hexdigest())}
    assert resolved.fingerprints() == {"loras": {"cat": hashlib.sha256(b"lora bytes").hexdigest()},
                                       "embeddings": {"<owl>": hashlib.sha256(b"embedding bytes").hexdigest()}}
