"""Manifest schema and validation: one test per violation, each checking that the message names
the column and the offending rows; streaming with bounded memory; defaults and seeds."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import MAX_SEED, Defaults, ManifestError, derive_seed, open_manifest, typo_of, validate

try:
    from sdcore.schedulers import NAMES
except ImportError:  # written concurrently; the names the contract promises
    NAMES = ("ddpm", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms")


def write(tmp_path, columns: dict | pa.Table, name="manifest.parquet", **kwargs) -> str:
    path = str(tmp_path / name)
    pq.write_table(columns if isinstance(columns, pa.Table) else pa.table(columns), path, **kwargs)
    return path


def check(path, defaults=None):
    with open_manifest(path) as m:
        return validate(m, defaults or Defaults())


def error(path, defaults=None) -> str:
    with pytest.raises(ManifestError) as e:
        check(path, defaults)
    return str(e.value)


def prompts(n):
    return [f"a photo of thing {i}" for i in range(n)]


def test_message_names_column_rows_and_values(tmp_path):
    steps = [20] * 20
    steps[4], steps[9], steps[17] = 0, 0, 1500
    path = write(tmp_path, {"prompt": prompts(20), "steps": steps})
    assert error(path) == f"{path}: column 'steps': 3 rows out of range 1..1000 (rows 4, 9, 17: 0, 0, 1500)"


def test_message_names_ids_when_the_manifest_has_them(tmp_path):
    path = write(tmp_path, {"prompt": prompts(3), "id": ["cat", "dog", "owl"], "steps": [20, 0, 20]})
    assert error(path).endswith("column 'steps': 1 row out of range 1..1000 (row 1: 0; ids 'dog')")


def test_only_the_first_rows_are_quoted_but_all_are_counted(tmp_path):
    path = write(tmp_path, {"prompt": prompts(30), "width": [100] * 30})
    msg = error(path)
    assert "column 'width': 30 rows not a multiple of 8 in 64..2048 (rows 0, 1, 2, 3, 4, …: 100, 100, 100, 100, 100)" in msg


def test_every_violation_is_reported_one_line_each(tmp_path):
    path = write(tmp_path, {"prompt": prompts(3), "steps": [0, 20, 20], "height": [64, 64, 70]})
    lines = error(path).splitlines()
    assert len(lines) == 2
    assert "column 'steps'" in lines[0] and "row 0: 0" in lines[0]
    assert "column 'height'" in lines[1] and "row 2: 70" in lines[1]


def test_missing_file(tmp_path):
    assert "no such file" in error(str(tmp_path / "nope.parquet"))


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("prompt\na cat\n")
    assert error(str(path)).startswith(f"{path}: not a Parquet file (")


def test_empty_manifest(tmp_path):
    path = write(tmp_path, pa.table({"prompt": pa.array([], pa.string())}))
    assert error(path) == f"{path}: the manifest has no rows"


def test_missing_prompt_column(tmp_path):
    path = write(tmp_path, {"caption": ["a cat"]})
    assert error(path) == f"{path}: missing required column 'prompt' (columns: caption)"


def test_null_prompt(tmp_path):
    path = write(tmp_path, {"prompt": ["a cat", None, "x", None]})
    assert "column 'prompt': 2 rows with null values (rows 1, 3)" in error(path)


def test_empty_prompt_is_allowed(tmp_path):
    assert check(write(tmp_path, {"prompt": ["", "a cat"]})).rows == 2


@pytest.mark.parametrize("column, values, expected", [
    ("prompt", [1, 2], "column 'prompt' has type int64; expected strings"),
    ("steps", ["20", "30"], "column 'steps' has type string; expected integers"),
    ("guidance_scale", ["high", "low"], "column 'guidance_scale' has type string; expected numbers"),
    ("id", [1.5, 2.5], "column 'id' has type double; expected strings or integers"),
    ("scheduler", [1, 2], "column 'scheduler' has type int64; expected strings"),
    ("seed", [True, False], "column 'seed' has type bool; expected integers"),
])
def test_wrong_column_type(tmp_path, column, values, expected):
    table = {"prompt": ["a", "b"], column: values}
    assert expected in error(write(tmp_path, table))


def test_fractional_values_in_an_integer_column(tmp_path):
    path = write(tmp_path, {"prompt": prompts(3), "steps": [20.0, 20.5, float("nan")]})
    assert "column 'steps': 2 rows with non-integer values (rows 1, 2: 20.5, nan)" in error(path)


def test_integral_floats_and_nulls_are_fine(tmp_path):
    # what pandas writes for an integer column with gaps
    path = write(tmp_path, {"prompt": prompts(3), "steps": [20.0, None, 30.0]})
    assert check(path, Defaults(steps=10)).steps_total == 60


@pytest.mark.parametrize("seeds, expected", [
    (pa.array([5, -1], pa.int64()), "column 'seed': 1 row out of range 0..2^63-1 (row 1: -1)"),
    (pa.array([2**63, 0], pa.uint64()), "column 'seed': 1 row out of range 0..2^63-1 (row 0: 9223372036854775808)"),
    (pa.array([1.0, 2.0**60]), "column 'seed': 1 row stored as floating point beyond 2^53"),
])
def test_seed_out_of_range(tmp_path, seeds, expected):
    assert expected in error(write(tmp_path, {"prompt": ["a", "b"], "seed": seeds}))


def test_largest_seed_is_fine(tmp_path):
    assert check(write(tmp_path, {"prompt": ["a"], "seed": pa.array([MAX_SEED - 1], pa.uint64())})).rows == 1


@pytest.mark.parametrize("column, values, expected", [
    ("guidance_scale", [7.5, -1.0, float("inf")], "column 'guidance_scale': 2 rows negative or not finite (rows 1, 2: -1.0, inf)"),
    ("width", [512, 60, 2056], "column 'width': 2 rows not a multiple of 8 in 64..2048 (rows 1, 2: 60, 2056)"),
    ("height", [512, 513, 64], "column 'height': 1 row not a multiple of 8 in 64..2048 (row 1: 513)"),
    ("num_images", [1, 0, 2], "column 'num_images': 1 row out of range 1..10000 (row 1: 0)"),
    ("scheduler", ["ddim", "euler_b", None], "column 'scheduler': 1 row with an unknown scheduler (row 1: 'euler_b'); known: "),
])
def test_out_of_range_values(tmp_path, column, values, expected):
    assert expected in error(write(tmp_path, {"prompt": prompts(3), column: values}))


@pytest.mark.parametrize("name, suggestion", [
    ("promt", "prompt"), ("negative_promt", "negative_prompt"), ("guidance", "guidance_scale"), ("sampler", "scheduler"),
    ("Steps", "steps"), ("widht", "width"), ("seeds", "seed"), ("num_image", "num_images"), ("cfg_scale", "guidance_scale"),
])
def test_typo_columns_are_errors_with_a_suggestion(tmp_path, name, suggestion):
    path = write(tmp_path, {"prompt": ["a"], name: [1]} if name != "promt" else {"prompt": ["a"], "promt": ["b"]})
    assert error(path) == f"{path}: unknown column {name!r}: did you mean {suggestion!r}? (rename it, or it would be ignored)"


@pytest.mark.parametrize("name", ["prompt_id", "label", "caption", "idx", "class", "style", "prompt_2", "size"])
def test_other_columns_pass_through(tmp_path, name):
    assert typo_of(name) is None
    summary = check(write(tmp_path, {"prompt": ["a"], name: [1]}))
    assert summary.passthrough == [name]


def test_reserved_output_column_names(tmp_path):
    path = write(tmp_path, {"prompt": ["a"], "model": ["x"]})
    assert error(path) == f"{path}: column 'model' is a name the output metadata uses; rename it"


def test_null_ids(tmp_path):
    path = write(tmp_path, {"prompt": prompts(3), "id": ["a", None, "c"]})
    assert "column 'id': 1 row with null values (row 1; ids None)" in error(path)


def test_duplicate_string_ids(tmp_path):
    path = write(tmp_path, {"prompt": prompts(5), "id": ["a", "b", "a", "c", "b"]})
    assert error(path) == f"{path}: column 'id': 2 duplicate ids ('a' at rows 0, 2; 'b' at rows 1, 4)"


def test_duplicate_integer_ids_across_batches_and_row_groups(tmp_path):
    ids = np.arange(200_000, dtype=np.int64)
    ids[150_000] = 7
    path = write(tmp_path, {"prompt": pa.array(["x"] * len(ids)), "id": ids}, row_group_size=50_000)
    assert error(path) == f"{path}: column 'id': 1 duplicate id (7 at rows 7, 150000)"


def test_ids_that_collide_after_num_images_expansion(tmp_path):
    path = write(tmp_path, {"prompt": prompts(3), "id": ["a", "b", "a-1"], "num_images": [2, 1, 1]})
    assert "column 'id': 1 image id made more than once ('a-1' at rows 0, 2)" in error(path)


def test_ids_equal_up_to_case_or_normalisation_are_refused_naming_both_rows(tmp_path):
    # 'Café' composed and decomposed, and 'Straße' / 'STRASSE': one file each on a case-insensitive,
    # normalising store (macOS, Windows, some object-store gateways).
    ids = ["Caf\u00e9", "x", "cafe\u0301", "Straße", "STRASSE", "ok"]
    path = write(tmp_path, {"prompt": prompts(6), "id": ids})
    assert error(path) == (
        f"{path}: column 'id': 2 groups of ids equal up to case or Unicode normalisation ({ids[0]!r} at row 0, "
        f"{ids[2]!r} at row 2; 'Straße' at row 3, 'STRASSE' at row 4); they would name one file on a "
        "case-insensitive or normalising store")
    path = write(tmp_path, {"prompt": prompts(2), "id": ["Straße", "strasse-1"], "num_images": [2, 1]}, name="n.parquet")
    assert "('Straße-1' at row 0, 'strasse-1' at row 1); they would name one file" in error(path)


def test_overlong_prompt_is_refused_naming_the_row(tmp_path):
    from jobs.manifest import MAX_PROMPT_CHARS

    path = write(tmp_path, {"prompt": ["ok", "x" * (MAX_PROMPT_CHARS + 1), "y" * MAX_PROMPT_CHARS],
                            "id": ["a", "long", "edge"]})
    assert error(path) == (f"{path}: column 'prompt': 1 row longer than 10,000 characters (row 1; ids 'long'); "
                           "CLIP reads only the first 77 tokens (about 300 characters) anyway")
    with pytest.raises(ManifestError, match="--negative-prompt is 10,001 characters long; the limit is 10,000"):
        Defaults(negative_prompt="n" * (MAX_PROMPT_CHARS + 1))


def test_integer_ids_never_collide_after_expansion(tmp_path):
    summary = check(write(tmp_path, {"prompt": prompts(3), "id": [1, -1, 10], "num_images": [11, 2, 1]}))
    assert summary.images == 14


@pytest.mark.parametrize("bad", ["a/b", "..", "", ".hidden", "x\ny", "what?"])
def test_ids_must_be_usable_as_file_names(tmp_path, bad):
    path = write(tmp_path, {"prompt": ["a", "b"], "id": ["fine id ü", bad]})
    assert f"column 'id': 1 row not usable as file names (row 1: {bad!r}; ids {bad!r})" in error(path)


def test_defaults_are_validated():
    with pytest.raises(ManifestError, match=r"--steps 0 is out of range 1..1000"):
        Defaults(steps=0)
    with pytest.raises(ManifestError, match=r"--width 100 must be a multiple of 8"):
        Defaults(width=100)
    with pytest.raises(ManifestError, match=r"--scheduler 'nope' is not one of ddpm"):
        Defaults(scheduler="nope")
    with pytest.raises(ManifestError, match=r"--guidance-scale nan"):
        Defaults(guidance_scale=float("nan"))
    with pytest.raises(ManifestError, match=r"--seed -1"):
        Defaults(seed=-1)


def test_summary(tmp_path):
    path = write(tmp_path, {
        "prompt": prompts(4), "width": [512, None, 768, 512], "steps": [10, 20, None, 10],
        "scheduler": ["ddim", None, "euler", "ddim"], "num_images": [1, 2, 1, None], "label": ["a", "b", "c", "d"],
    })
    s = check(path, Defaults(steps=30, scheduler="pndm", width=256))
    assert (s.rows, s.images) == (4, 5)
    assert s.sizes == {(512, 512): 2, (256, 512): 2, (768, 512): 1}
    assert s.schedulers == {"ddim": 2, "pndm": 2, "euler": 1}
    assert s.steps_total == 10 + 2 * 20 + 30 + 10
    assert s.passthrough == ["label"]
    assert "rows             4" in s.format()


def test_string_variants_and_dictionary_columns_are_accepted(tmp_path):
    table = pa.table({
        "prompt": pa.array(["a", "b"], pa.large_string()),
        "scheduler": pa.array(["ddim", "ddim"]).dictionary_encode(),
        "id": pa.array(["x", "y"]).dictionary_encode(),
    })
    assert check(write(tmp_path, table)).schedulers == {"ddim": 2}


def test_fingerprint_follows_content_not_the_file(tmp_path):
    a = write(tmp_path, {"prompt": ["a cat", "a dog"]}, name="a.parquet")
    b = write(tmp_path, {"prompt": ["a cat", "a dog"]}, name="b.parquet")
    c = write(tmp_path, {"prompt": ["a cat", "a cow"]}, name="c.parquet")
    fp = {p: open_manifest(p).fingerprint() for p in (a, b, c)}
    assert fp[a] == fp[b] != fp[c]


def test_manifest_edited_in_place_gets_another_fingerprint(tmp_path):
    # Same size, same footer (no statistics, no compression, no dictionary): only the data pages differ.
    path = tmp_path / "m.parquet"
    options = {"write_statistics": False, "compression": "NONE", "use_dictionary": False}
    pq.write_table(pa.table({"prompt": ["a red cat", "a dog"]}), path, **options)
    before, fingerprint = path.read_bytes(), open_manifest(str(path)).fingerprint()
    pq.write_table(pa.table({"prompt": ["a red owl", "a dog"]}), path, **options)
    after = path.read_bytes()
    footer = 8 + int.from_bytes(after[-8:-4], "little")
    assert len(after) == len(before) and after[-footer:] == before[-footer:] and after != before
    assert open_manifest(str(path)).fingerprint() != fingerprint


def test_read_rows_across_row_groups(tmp_path):
    path = write(tmp_path, {"prompt": prompts(100), "n": list(range(100))}, row_group_size=7)
    with open_manifest(path) as m:
        assert m.read(5, 23).column("n").to_pylist() == list(range(5, 23))
        assert m.read(98, 100).column("prompt").to_pylist() == prompts(100)[98:]
        assert m.read(14, 14).num_rows == 0


def test_derived_seeds():
    assert derive_seed(0, "cat") == derive_seed(0, "cat")
    assert len({derive_seed(0, "cat"), derive_seed(1, "cat"), derive_seed(0, "dog")}) == 3
    assert all(0 <= derive_seed(s, str(i)) < MAX_SEED for s in range(5) for i in range(200))


def test_streaming_a_large_manifest_keeps_memory_flat(tmp_path):
    """200k rows with a wide pass-through column: validation decodes one batch at a time and never
    reads pass-through columns, so the Arrow peak stays well below even the validated columns."""
    n = 200_000
    table = pa.table({
        "id": pa.array([f"row-{i}" for i in range(n)]),
        "prompt": pa.array([f"a photo of a cat number {i} " + "x" * 60 for i in range(n)]),
        "steps": pa.array(np.full(n, 20, dtype=np.int64)),
        "blob": pa.array([b"\x00" * 400] * n),  # pass-through payload, ~80 MB decoded
    })
    path = write(tmp_path, table, row_group_size=16_384)
    validated = table.select(["id", "prompt", "steps"]).nbytes  # what validation has to look at
    del table
    script = textwrap.dedent(f"""
        import json, tracemalloc, pyarrow as pa
        from jobs.manifest import Defaults, open_manifest, scheduler_names, validate
        scheduler_names()  # its imports are not the manifest's memory
        tracemalloc.start()
        with open_manifest({path!r}) as m:
            s = validate(m, Defaults())
        print(json.dumps({{"rows": s.rows, "arrow_peak": pa.default_memory_pool().max_memory(),
                           "python_peak": tracemalloc.get_traced_memory()[1]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout)
    assert stats["rows"] == n
    assert stats["arrow_peak"] < validated / 2, stats
    assert stats["python_peak"] < 40e6, stats


# --- init images, masks, strength, LoRAs -------------------------------------------------------------

def check_loras(path, declared=()):
    with open_manifest(path) as m:
        return validate(m, Defaults(), declared)


def test_image_columns_strength_and_loras_are_parameters_not_pass_through(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"png")
    path = write(tmp_path, {
        "prompt": prompts(4), "init_image": ["imgs/a.png", None, "imgs/a.png", None],
        "mask_image": [None, None, str(tmp_path / "imgs" / "a.png"), None], "strength": [0.5, None, 1.0, None],
        "loras": ["cat:0.8,dog", None, "", "dog:-0.5"], "label": ["x"] * 4})
    summary = check_loras(path, ["cat", "dog"])
    assert summary.passthrough == ["label"]
    assert summary.modes == {"img2img": 1, "inpaint": 1, "txt2img": 2}
    assert "modes (images)   txt2img: 2, img2img: 1, inpaint: 1" in summary.format()


def test_binary_and_image_struct_columns_are_accepted(tmp_path):
    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = write(tmp_path, pa.table({
        "prompt": prompts(3),
        "init_image": pa.array([{"bytes": b"abc", "path": None}, None, {"bytes": None, "path": None}], image_struct),
        "mask_image": pa.array([b"mask", None, None], pa.binary()),
        "loras": pa.array([[{"name": "cat", "scale": 0.5}], [], None], pa.list_(pa.struct([("name", pa.string()), ("scale", pa.float64())]))),
    }))
    assert check_loras(path, ["cat"]).modes == {"inpaint": 1, "txt2img": 2}


@pytest.mark.parametrize("column, values, expected", [
    ("init_image", pa.array([1, 2]), "column 'init_image' has type int64; expected paths (strings), bytes"),
    ("loras", pa.array([[1], [2]]), "column 'loras' has type list<element: int64>; expected strings 'name:scale,...'"),
    ("strength", pa.array(["a", "b"]), "column 'strength' has type string; expected numbers"),
])
def test_image_and_lora_columns_of_the_wrong_type_are_refused(tmp_path, column, values, expected):
    path = write(tmp_path, pa.table({"prompt": prompts(2), column: values}))
    assert expected in error(path)


def test_bad_strength_is_named_with_its_rows(tmp_path):
    path = write(tmp_path, {"prompt": prompts(4), "id": ["a", "b", "c", "d"], "strength": [0.5, 0.0, 1.5, float("nan")]})
    assert (f"{path}: column 'strength': 3 rows out of range 0 < strength <= 1 (rows 1, 2, 3: 0.0, 1.5, nan; "
            "ids 'b', 'c', 'd'); it is how much of the init image is repainted") in error(path)


def test_a_strength_that_leaves_no_step_is_refused_for_rows_with_an_init_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    path = write(tmp_path, {"prompt": prompts(4), "init_image": ["a.png", "a.png", None, "a.png"],
                            "steps": [10, 4, 4, 50], "strength": [0.1, 0.2, 0.2, None]})
    assert error(path) == (f"{path}: column 'strength': 1 row leaving no step to denoise (steps x strength < 1) "
                           "(row 1: 0.2); raise the row's strength or its steps")
    # the default strength counts where a row has none
    assert "2 rows leaving no step to denoise (steps x strength < 1) (rows 1, 3: 0.2, None)" in error(path, Defaults(strength=0.01))


def test_a_mask_without_an_init_image_is_refused(tmp_path):
    (tmp_path / "m.png").write_bytes(b"png")
    path = write(tmp_path, {"prompt": prompts(3), "id": ["a", "b", "c"], "mask_image": [None, "m.png", "m.png"],
                            "init_image": ["m.png", None, "m.png"]})
    assert "column 'mask_image': 1 row with a mask but no init_image (row 1; ids 'b')" in error(path)
    no_init = write(tmp_path, {"prompt": prompts(1), "mask_image": ["m.png"]}, name="no_init.parquet")
    assert "column 'mask_image': 1 row with a mask but no init_image (row 0)" in error(no_init)


def test_missing_images_are_named_with_the_path_they_resolve_to(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"png")
    path = write(tmp_path, {"prompt": prompts(4), "id": ["w", "x", "y", "z"],
                            "init_image": ["imgs/a.png", "imgs/b.png", "nowhere/a.png", str(tmp_path / "imgs" / "a.png")]})
    assert ("column 'init_image': 2 rows naming a file that does not exist (rows 1, 2: 'imgs/b.png', 'nowhere/a.png'; "
            f"ids 'x', 'y'); relative paths are relative to the manifest's folder, {tmp_path}") in error(path)


def test_image_existence_lists_each_folder_once(tmp_path):
    """A file that appears after its folder was listed is still missing: rows reuse the listing
    rather than asking the store about each file."""
    from jobs.images import Existence

    (tmp_path / "a.png").write_bytes(b"png")
    existence = Existence()
    assert existence.missing([str(tmp_path / "a.png"), str(tmp_path / "b.png"), None]).tolist() == [False, True, False]
    (tmp_path / "b.png").write_bytes(b"png")
    assert existence.missing([str(tmp_path / "b.png")]).tolist() == [True]
    assert Existence().missing([str(tmp_path / "b.png")]).tolist() == [False]


def test_loras_must_be_declared_and_well_formed(tmp_path):
    path = write(tmp_path, {"prompt": prompts(5), "loras": ["cat:0.8", "owl", "cat:x", "cat,cat:0.5", ":0.5"]})
    with pytest.raises(ManifestError) as e:
        check_loras(path, ["cat"])
    msg = str(e.value)
    assert ("column 'loras': 3 rows malformed (rows 2, 3, 4: 'cat:x', 'cat,cat:0.5', ':0.5'); 'cat:x': the scale 'x' "
            "is not a number; write 'name:scale,...' or a list of {name, scale} structs") in msg
    assert "column 'loras': 1 row naming a LoRA that is not declared (row 1: 'owl'); declared: cat" in msg
    listed = write(tmp_path, pa.table({"prompt": prompts(1), "loras": pa.array([[{"name": "owl", "scale": 1.0}]])}),
                   name="listed.parquet")
    assert "(row 0: 'owl'); declared: none (add one with --lora NAME=PATH_OR_URI)" in error(listed)


def test_strength_and_resize_defaults_are_checked():
    with pytest.raises(ManifestError, match=r"--strength 0.0 must be a number in 0 < strength <= 1; "
                                            r"--resize 'fill' is not one of stretch, crop"):
        Defaults(strength=0.0, resize="fill")


@pytest.mark.parametrize("name, guess", [("mask", "mask_image"), ("init_img", "init_image"),
                                         ("denoising_strength", "strength"), ("lora", "loras"), ("strenght", "strength")])
def test_typos_of_the_new_columns_are_caught(name, guess):
    assert typo_of(name) == guess
