"""`sdbatch manifest build`: every source kind, templates and sweeps, typed columns, seeds, each
error message, and the committed example manifests against the commands that build them."""
import gzip
import json
import re
import shlex
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from jobs.manifest import Defaults, ManifestError, derive_seed, open_manifest, validate
from jobs.manifest_build import build, manifest_app
from jobs.plan import read_shard, shards
from sdcore.schedulers import NAMES

ROOT = Path(__file__).resolve().parents[1]


def cli() -> typer.Typer:
    """The sdbatch app with the sub-app registered the way jobs/cli.py registers it."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    app.add_typer(manifest_app, name="manifest")
    return app


def sdbatch(*args):
    return CliRunner().invoke(cli(), [str(a) for a in args])


def rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def schema(path) -> dict[str, str]:
    return {f.name: str(f.type) for f in pq.read_schema(path)}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- sources

def test_text_file_one_prompt_a_line(tmp_path):
    src = write(tmp_path / "prompts.txt", "# a comment\n  a cat  \n\nan owl, at night\r\n   \n# another\nnaïve café ☕\n")
    out = tmp_path / "m.parquet"
    summary = build(str(out), str(src))
    assert rows(out) == [{"id": 0, "prompt": "a cat"}, {"id": 1, "prompt": "an owl, at night"}, {"id": 2, "prompt": "naïve café ☕"}]
    assert schema(out) == {"id": "int64", "prompt": "string"}
    assert (summary.manifest, summary.rows, summary.images) == (str(out), 3, 3)


def test_compressed_source_and_format_option(tmp_path):
    (tmp_path / "p.txt.gz").write_bytes(gzip.compress(b"a cat\na dog\n"))
    build(str(tmp_path / "a.parquet"), str(tmp_path / "p.txt.gz"))
    assert [r["prompt"] for r in rows(tmp_path / "a.parquet")] == ["a cat", "a dog"]
    write(tmp_path / "prompts.list", '{"prompt": "a cat"}\n')
    build(str(tmp_path / "b.parquet"), str(tmp_path / "prompts.list"), fmt="jsonl")
    assert rows(tmp_path / "b.parquet") == [{"id": 0, "prompt": "a cat"}]


def test_csv_parses_parameters_and_keeps_other_columns_as_text(tmp_path):
    src = write(tmp_path / "p.csv", "\ufeffid,prompt,steps,guidance_scale,width,label,note\n"
                                    'a1,"a cat, sitting",30,7.5,512.0,007,\n'
                                    'a2,"a ""quoted""\nprompt",,5,768,12,x\n'
                                    "\n"
                                    "a3,,  25 ,,,3,\n")
    out = tmp_path / "m.parquet"
    build(str(out), str(src))
    assert schema(out) == {"id": "string", "prompt": "string", "steps": "int64", "guidance_scale": "double",
                           "width": "int64", "label": "string", "note": "string"}
    assert rows(out) == [
        {"id": "a1", "prompt": "a cat, sitting", "steps": 30, "guidance_scale": 7.5, "width": 512, "label": "007", "note": ""},
        {"id": "a2", "prompt": 'a "quoted"\nprompt', "steps": None, "guidance_scale": 5.0, "width": 768, "label": "12", "note": "x"},
        {"id": "a3", "prompt": "", "steps": 25, "guidance_scale": None, "width": None, "label": "3", "note": ""},
    ]


def test_csv_image_strength_and_lora_columns_are_typed_and_checked_later(tmp_path):
    src = write(tmp_path / "p.csv", "prompt,init_image,mask_image,strength,loras\n"
                                    "a cat,cats/1.png,,0.5,cat:0.8\n"
                                    "a dog,,,,\n")
    out = tmp_path / "m.parquet"
    summary = build(str(out), str(src))  # the images and the LoRA are the job's to check: --lora, the files
    assert summary.modes == {"img2img": 1, "txt2img": 1}
    assert schema(out) == {"id": "int64", "prompt": "string", "init_image": "string", "mask_image": "string",
                           "strength": "double", "loras": "string"}
    assert [(r["init_image"], r["strength"], r["loras"]) for r in rows(out)] == [("cats/1.png", 0.5, "cat:0.8"),
                                                                                (None, None, None)]
    with open_manifest(str(out)) as m, pytest.raises(ManifestError, match="naming a file that does not exist"):
        validate(m, Defaults(), ["cat"])


def test_tsv_and_prompt_column(tmp_path):
    src = write(tmp_path / "p.tsv", "caption\tscheduler\na cat\tddim\na dog\t\n")
    out = tmp_path / "m.parquet"
    build(str(out), str(src), prompt_column="caption")
    assert rows(out) == [{"id": 0, "prompt": "a cat", "scheduler": "ddim"}, {"id": 1, "prompt": "a dog", "scheduler": None}]


def test_jsonl_keeps_json_types(tmp_path):
    src = write(tmp_path / "p.jsonl", "\n".join([
        json.dumps({"text": "a cat", "seed": 5, "label": 3, "tags": ["x", "y"]}),
        "",
        json.dumps({"text": "a dog", "steps": 20.0, "guidance_scale": 4, "score": 0.5}),
    ]) + "\n")
    out = tmp_path / "m.parquet"
    build(str(out), str(src), prompt_column="text")
    assert schema(out) == {"id": "int64", "prompt": "string", "seed": "int64", "label": "int64", "tags": "list<element: string>",
                           "steps": "int64", "guidance_scale": "double", "score": "double"}
    assert rows(out) == [
        {"id": 0, "prompt": "a cat", "seed": 5, "label": 3, "tags": ["x", "y"], "steps": None, "guidance_scale": None, "score": None},
        {"id": 1, "prompt": "a dog", "seed": None, "label": None, "tags": None, "steps": 20, "guidance_scale": 4.0, "score": 0.5},
    ]


def test_integer_parameters_are_exact_and_take_spreadsheet_spellings(tmp_path):
    big, odd = 2**63 - 1, 2**53 + 1  # float64 would round both
    src = write(tmp_path / "p.csv", f"prompt,seed,steps\na,{big},3e1\nb,{odd}, 30.0 \n")
    build(str(tmp_path / "a.parquet"), str(src))
    assert [(r["seed"], r["steps"]) for r in rows(tmp_path / "a.parquet")] == [(big, 30), (odd, 30)]
    src = write(tmp_path / "p.jsonl", json.dumps({"prompt": "a", "seed": odd, "steps": 30.0}) + "\n")
    build(str(tmp_path / "b.parquet"), str(src))
    assert [(r["seed"], r["steps"]) for r in rows(tmp_path / "b.parquet")] == [(odd, 30)]
    with pytest.raises(ManifestError, match=r"p.csv: column 'seed': 9223372036854775808 \(row 0\) does not fit a 64-bit integer"):
        build(str(tmp_path / "c.parquet"), str(write(tmp_path / "p.csv", f"prompt,seed\na,{big + 1}\n")))


def test_csv_errors_count_rows_like_the_manifest_across_multiline_prompts(tmp_path):
    src = write(tmp_path / "p.csv", 'prompt,steps\n"a cat\non two lines",20\nb,30\nc,many\n')
    with pytest.raises(ManifestError, match=r"p.csv: column 'steps': 'many' \(row 2\) is not an integer"):
        build(str(tmp_path / "m.parquet"), str(src))


def test_fsspec_urls_for_sources_values_and_output():
    mem = fsspec.filesystem("memory")
    mem.pipe_file("/build-test/animals.txt", b"cat\ndog\n")
    build("memory://build-test/out/m.parquet", template="a {animal}", values=["animal=memory://build-test/animals.txt"])
    with mem.open("/build-test/out/m.parquet", "rb") as f:
        assert pq.read_table(f).column("prompt").to_pylist() == ["a cat", "a dog"]
    mem.rm("/build-test", recursive=True)


# ------------------------------------------------------------------------------------ templates

def test_template_cross_product_with_label_columns(tmp_path):
    animals = write(tmp_path / "animals.txt", "# labels\ncat\n\ndog\n")
    out = tmp_path / "m.parquet"
    summary = build(str(out), template="a {animal} in {place}, {animal}! {{not a field}}",
                    values=[f"animal={animals}", "place=snow, a park ,"])
    assert rows(out) == [
        {"id": 0, "prompt": "a cat in snow, cat! {not a field}", "animal": "cat", "place": "snow"},
        {"id": 1, "prompt": "a cat in a park, cat! {not a field}", "animal": "cat", "place": "a park"},
        {"id": 2, "prompt": "a dog in snow, dog! {not a field}", "animal": "dog", "place": "snow"},
        {"id": 3, "prompt": "a dog in a park, dog! {not a field}", "animal": "dog", "place": "a park"},
    ]
    assert summary.passthrough == ["animal", "place"]
    # the first --values is the outermost loop, whatever the template's order
    build(str(out), template="a {animal} in {place}", values=["place=snow,park", "animal=cat,dog"])
    assert [r["prompt"] for r in rows(out)] == ["a cat in snow", "a dog in snow", "a cat in park", "a dog in park"]


def test_template_placeholder_that_is_a_parameter_and_a_single_inline_value(tmp_path):
    out = tmp_path / "m.parquet"
    build(str(out), template="{steps} steps of {scheduler}", values=["steps=10,20", "scheduler=ddim,"])
    assert schema(out) == {"id": "int64", "prompt": "string", "steps": "int64", "scheduler": "string"}
    assert [(r["prompt"], r["steps"]) for r in rows(out)] == [("10 steps of ddim", 10), ("20 steps of ddim", 20)]
    build(str(out), template="just one prompt", num_images=3)
    assert rows(out) == [{"id": 0, "prompt": "just one prompt", "num_images": 3}]


def test_parameter_sweeps_repeat_each_row_with_a_shared_seed(tmp_path):
    src = write(tmp_path / "p.txt", "a cat\na dog\n")
    out = tmp_path / "m.parquet"
    build(str(out), str(src), values=["scheduler=ddim,euler", "guidance_scale=3,7.5"], seed=11)
    got = rows(out)
    assert [(r["id"], r["prompt"], r["scheduler"], r["guidance_scale"]) for r in got] == [
        (0, "a cat", "ddim", 3.0), (1, "a cat", "ddim", 7.5), (2, "a cat", "euler", 3.0), (3, "a cat", "euler", 7.5),
        (4, "a dog", "ddim", 3.0), (5, "a dog", "ddim", 7.5), (6, "a dog", "euler", 3.0), (7, "a dog", "euler", 7.5),
    ]
    assert [r["seed"] for r in got] == [derive_seed(11, "0")] * 4 + [derive_seed(11, "1")] * 4
    assert schema(out)["guidance_scale"] == "double"


# ----------------------------------------------------------------------- num_images, seeds, --set

def test_seeds_are_what_the_job_would_derive(tmp_path):
    src = write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(5)))
    plain, seeded = tmp_path / "plain.parquet", tmp_path / "seeded.parquet"
    build(str(plain), str(src), num_images=2)
    build(str(seeded), str(src), num_images=2, seed=1234)
    assert "seed" not in schema(plain) and schema(seeded)["seed"] == "int64"
    assert [r["seed"] for r in rows(seeded)] == [derive_seed(1234, str(i)) for i in range(5)]

    def images(path):
        with open_manifest(str(path)) as m:
            return [(item.id, item.seed) for s in shards(m.num_rows, 2) for item in read_shard(m, s, Defaults(seed=1234)).items]

    assert images(plain) == images(seeded)  # the same images, with or without seeds written down
    assert [i for i, _ in images(seeded)][:4] == ["0-0", "0-1", "1-0", "1-1"]


def test_seed_fills_only_rows_without_one(tmp_path):
    src = write(tmp_path / "p.jsonl", '{"prompt": "a", "seed": 5}\n{"prompt": "b"}\n')
    build(str(tmp_path / "m.parquet"), str(src), seed=9)
    assert [r["seed"] for r in rows(tmp_path / "m.parquet")] == [5, derive_seed(9, "1")]


def test_set_types_and_fills_only_nulls(tmp_path):
    src = write(tmp_path / "p.csv", "prompt,steps,scheduler\na,10,\nb,,euler\n")
    out = tmp_path / "m.parquet"
    build(str(out), str(src), sets=["steps=30", "guidance_scale=6", "width=640", "scheduler=ddim",
                                    "negative_prompt=blurry, text", "source=synthetic", "seed=7"], num_images=2)
    assert schema(out) == {"id": "int64", "prompt": "string", "steps": "int64", "scheduler": "string", "guidance_scale": "double",
                           "width": "int64", "negative_prompt": "string", "source": "string", "seed": "int64", "num_images": "int64"}
    got = rows(out)
    assert [(r["steps"], r["scheduler"]) for r in got] == [(10, "ddim"), (30, "euler")]  # CSV '' is a null scheduler
    assert {(r["guidance_scale"], r["width"], r["negative_prompt"], r["source"], r["seed"], r["num_images"]) for r in got} == {
        (6.0, 640, "blurry, text", "synthetic", 7, 2)}


def test_set_on_a_typed_pass_through_column(tmp_path):
    src = write(tmp_path / "p.jsonl", '{"prompt": "a", "label": 3}\n{"prompt": "b", "label": null}\n')
    build(str(tmp_path / "m.parquet"), str(src), sets=["label=4"])
    assert [r["label"] for r in rows(tmp_path / "m.parquet")] == [3, 4]


# --------------------------------------------------------------------------------------- errors

ERRORS = [
    # (files to create, build kwargs, message fragment)
    ({}, dict(source="{d}/nope.txt"), "nope.txt: no such file"),
    ({}, dict(), "nothing to build from"),
    ({"p.txt": "a\n"}, dict(source="{d}/p.txt", template="a {x}", values=["x=1,2"]), "not both"),
    ({"p.txt": "# only comments\n\n"}, dict(source="{d}/p.txt"), "p.txt: no prompts in it"),
    ({"p.csv": "prompt,label\n"}, dict(source="{d}/p.csv"), "p.csv: no prompts in it"),
    ({"p.csv": ""}, dict(source="{d}/p.csv"), "p.csv: empty file"),
    ({"p.doc": "a\n"}, dict(source="{d}/p.doc"), "cannot tell the format from the file name; pass --format"),
    ({"p.txt": "a\n"}, dict(source="{d}/p.txt", fmt="xml"), "--format 'xml' is not one of txt, csv, tsv, jsonl"),
    ({"p.csv": "text,label\na,b\n"}, dict(source="{d}/p.csv"), "no 'prompt' column (columns: text, label); name the column that holds the prompts with --prompt-column"),
    ({"p.csv": "text,label\na,b\n"}, dict(source="{d}/p.csv", prompt_column="caption"), "--prompt-column 'caption': no such column (columns: text, label)"),
    ({"p.csv": "text,prompt\na,b\n"}, dict(source="{d}/p.csv", prompt_column="text"), "has a 'prompt' column besides --prompt-column 'text'"),
    ({"p.txt": "a\n"}, dict(source="{d}/p.txt", prompt_column="x"), "--prompt-column names a column of a CSV or JSONL source"),
    ({"p.csv": "prompt,prompt\na,b\n"}, dict(source="{d}/p.csv"), "column 'prompt' appears 2 times in the header"),
    ({"p.csv": "prompt,\na,b\n"}, dict(source="{d}/p.csv"), "column 2 of the header has no name"),
    ({"p.csv": "prompt,label\na,b\nc\n"}, dict(source="{d}/p.csv"), "p.csv: CSV parse error: Row #3: Expected 2 columns, got 1: c"),
    ({"p.csv": "prompt,steps\na,ten\n"}, dict(source="{d}/p.csv"), "p.csv: column 'steps': 'ten' (row 0) is not an integer"),
    ({"p.csv": "prompt,guidance_scale\na,high\n"}, dict(source="{d}/p.csv"), "p.csv: column 'guidance_scale': 'high' (row 0) is not a number"),
    ({"p.jsonl": '{"prompt": "a"}\n{"prompt": "b",}\n'}, dict(source="{d}/p.jsonl"), "p.jsonl: JSON parse error: Missing a name for object member. in row 1"),
    ({"p.jsonl": '["a"]\n'}, dict(source="{d}/p.jsonl"), "p.jsonl: JSON parse error: Column() changed from object to array in row 0"),
    ({"p.jsonl": '{"prompt": "a", "x": 1}\n{"prompt": "b", "x": "one"}\n'}, dict(source="{d}/p.jsonl"), "p.jsonl: JSON parse error: Column(/x) changed from number to string in row 1"),
    ({"p.jsonl": '{"prompt": "a", "steps": 2.5}\n'}, dict(source="{d}/p.jsonl"), "p.jsonl: column 'steps': 2.5 (row 0) is not an integer"),
    ({"p.jsonl": '{"prompt": "a", "steps": true}\n'}, dict(source="{d}/p.jsonl"), "p.jsonl: JSON parse error: Column(/steps) changed from number_or_string to boolean in row 0"),
    ({"p.jsonl": '{"prompt": 3}\n'}, dict(source="{d}/p.jsonl"), "p.jsonl: JSON parse error: Column(/prompt) changed from string to number in row 0"),
    ({"p.txt": b"caf\xe9\n"}, dict(source="{d}/p.txt"), "p.txt: line 1: not UTF-8 text"),
    ({}, dict(template="a {animal} in {place}", values=["animal=cat,dog"]), "--template has {place} but no --values place=... to fill it"),
    ({}, dict(template="a {animal}", values=["animal=cat,dog", "colour=red,blue"]), "--values colour=...: the template has no {colour} placeholder"),
    ({"p.txt": "a\n"}, dict(source="{d}/p.txt", values=["colour=red,blue"]), "--values colour=...: it is not a parameter column"),
    ({}, dict(template="a {animal", values=["animal=cat,"]), "write {{ and }} for literal braces"),
    ({}, dict(template="a {animal:>5}", values=["animal=cat,"]), "placeholders are plain {name}, got {animal:>5}"),
    ({}, dict(template="a {0}"), "placeholders are plain {name}, got {0}"),
    ({}, dict(template="a {prompt}", values=["prompt=x,"]), "{prompt} cannot be a placeholder"),
    ({}, dict(template="a {animal}", values=["animal=animals.txt"]), "--values animal=animals.txt: no such file (for values on the command line, separate them with commas: animal=cat,dog)"),
    ({"empty.txt": "# nothing\n"}, dict(template="a {animal}", values=["animal={d}/empty.txt"]), "no values (a file needs non-blank, non-comment lines)"),
    ({}, dict(template="a {animal}", values=["animal=cat,dog,cat"]), "--values animal: 'cat' appears more than once"),
    ({}, dict(template="a {animal}", values=["animal=cat,", "animal=dog,"]), "--values animal=... is given twice"),
    ({}, dict(template="a {animal}", values=["animal"]), "expected NAME=a,b,c or NAME=FILE"),
    ({}, dict(template="a", values=["steps=10,fast"]), "--values steps: column 'steps': 'fast' (row 1) is not an integer"),
    ({}, dict(template="a", sets=["steps=abc"]), "--set steps: column 'steps': 'abc' (row 0) is not an integer"),
    ({}, dict(template="a", sets=["width=30.5"]), "--set width: column 'width': 30.5 (row 0) is not an integer"),
    ({}, dict(template="a", sets=["steps="]), "--set 'steps=': no value after '='"),
    ({}, dict(template="a", sets=["steps"]), "--set 'steps': expected KEY=VALUE"),
    ({}, dict(template="a", sets=["id=3"]), "--set id=...: the builder makes 'id' itself"),
    ({}, dict(template="a", sets=["steps=3", "steps=4"]), "--set steps=... is given twice"),
    ({}, dict(template="a", sets=["num_images=3"], num_images=2), "--num-images and --set num_images=... both given"),
    ({}, dict(template="a {animal}", values=["animal=cat,"], sets=["animal=dog"]), "--set animal=dog: the column comes from --values animal=..."),
    ({}, dict(template="a", values=["scheduler=ddim,euler"], sets=["scheduler=pndm"]), "--set scheduler=pndm: the column comes from --values scheduler=..."),
    ({}, dict(template="a", seed=1, sets=["seed=3"]), "--set seed=3: the column comes from --seed"),
    ({}, dict(template="a", values=["seed=1,2"], seed=3), "--seed and --values seed=... both give the seeds"),
    ({}, dict(template="a", seed=-1), "--seed -1 is out of range 0..2^63-1"),
    ({"p.csv": "id,prompt\nx,a\n"}, dict(source="{d}/p.csv", values=["scheduler=ddim,euler"]), "the source's 'id' column would repeat with them"),
    ({"p.csv": "prompt,scheduler\na,ddim\n"}, dict(source="{d}/p.csv", values=["scheduler=ddim,euler"]), "the source already has a 'scheduler' column"),
    ({"p.jsonl": '{"prompt": "a", "label": 3}\n'}, dict(source="{d}/p.jsonl", sets=["label=x"]), "--set label=x: the source's 'label' column holds int64"),
    # what only validation can see: the manifest is checked before anything is written
    ({}, dict(template="a", sets=["steps=0"]), "column 'steps': 1 row out of range 1..1000"),
    ({}, dict(template="a", values=["scheduler=ddim,eulr"]), "column 'scheduler': 1 row with an unknown scheduler"),
    ({}, dict(template="a", sets=["widht=512"]), "unknown column 'widht': did you mean 'width'?"),
    ({"p.csv": "id,prompt\nx,a\nx,b\n"}, dict(source="{d}/p.csv"), "column 'id': 1 duplicate id ('x' at rows 0, 1)"),
]


@pytest.mark.parametrize("files, kwargs, message", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_errors_name_the_problem_and_write_nothing(tmp_path, files, kwargs, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    kwargs = {k: v.format(d=tmp_path) if k == "source" else [x.format(d=tmp_path) for x in v] if k == "values" else v
              for k, v in kwargs.items()}
    out = tmp_path / "out" / "m.parquet"
    with pytest.raises(ManifestError) as e:
        build(str(out), **kwargs)
    assert message in str(e.value)
    assert "memory://" not in str(e.value)  # validation errors name the real output
    assert not out.exists()


def test_output_must_not_be_the_source(tmp_path):
    src = write(tmp_path / "p.txt", "a\n")
    with pytest.raises(ManifestError, match="is the SOURCE file"):
        build(str(src), str(src))
    assert src.read_text() == "a\n"


# -------------------------------------------------------------------------------------- command

def test_command_writes_and_prints_the_summary(tmp_path):
    write(tmp_path / "p.txt", "a cat\na dog\n")
    out = tmp_path / "m.parquet"
    r = sdbatch("manifest", "build", tmp_path / "p.txt", "-o", out, "--num-images", 2, "--seed", 5,
                "--set", "steps=20", "--values", "scheduler=ddim,euler")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(f"wrote {out}\n{out}: OK\n")
    assert "rows             4" in r.stdout and "images           8" in r.stdout
    assert [(x["scheduler"], x["steps"], x["num_images"]) for x in rows(out)] == [("ddim", 20, 2), ("euler", 20, 2)] * 2


def test_command_user_error_exits_2_with_one_line(tmp_path):
    r = sdbatch("manifest", "build", "-o", tmp_path / "m.parquet", "--template", "a {animal}")
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr == "sdbatch: error: --template has {animal} but no --values animal=... to fill it\n"
    assert not (tmp_path / "m.parquet").exists()


# ------------------------------------------------------------------------------- the examples

def documented_commands() -> dict[str, list[str]]:
    """manifest name -> the `sdbatch manifest build` arguments in manifests/README.md."""
    text = (ROOT / "manifests" / "README.md").read_text()
    commands = {}
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        args = shlex.split(block.replace("\\\n", " "))
        assert args[:3] == ["sdbatch", "manifest", "build"], block
        commands[Path(args[args.index("-o") + 1]).name] = args[1:]
    return commands


def declared_loras(name: str) -> list[str]:
    """The LoRA names that manifests/README.md's `sdbatch run` of manifest `name` declares with --lora."""
    text = (ROOT / "manifests" / "README.md").read_text()
    names = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        args = shlex.split(block.replace("\\\n", " "))
        if args[:2] == ["sdbatch", "run"] and Path(args[2]).name == name:
            names += [args[i + 1].partition("=")[0] for i, a in enumerate(args[:-1]) if a == "--lora"]
    return names


def test_every_example_manifest_is_documented():
    assert sorted(documented_commands()) == sorted(p.name for p in (ROOT / "manifests").glob("*.parquet")) == [
        "class_conditioned.parquet", "demo.parquet", "mixed_sizes.parquet", "modes.parquet",
        "scheduler_comparison.parquet"]


@pytest.mark.parametrize("name", ["demo.parquet", "class_conditioned.parquet", "mixed_sizes.parquet",
                                  "scheduler_comparison.parquet", "modes.parquet"])
def test_example_manifest_equals_its_documented_build(tmp_path, monkeypatch, name):
    committed = ROOT / "manifests" / name
    with open_manifest(str(committed)) as m:  # its image files exist, its LoRAs are the documented job's
        validate(m, Defaults(), declared_loras(name))
    args = documented_commands()[name]
    args[args.index("-o") + 1] = str(tmp_path / name)
    monkeypatch.chdir(ROOT)  # the documented paths are relative to the repository root
    r = sdbatch(*args)
    assert r.exit_code == 0, r.output
    rebuilt, expected = pq.read_table(tmp_path / name), pq.read_table(committed)
    assert rebuilt.schema.equals(expected.schema, check_metadata=True)
    assert rebuilt.equals(expected), f"manifests/{name} is stale: run its command in manifests/README.md again"


def test_examples_are_what_they_claim():
    demo = pq.read_table(ROOT / "manifests" / "demo.parquet").to_pylist()
    assert 10 <= len(demo) <= 16
    assert {(r["width"], r["height"], r["steps"]) for r in demo} == {(64, 64, 8)}  # seconds on a CPU with builtin:tiny
    assert {r["scheduler"] for r in demo} == set(NAMES)

    cls = pq.read_table(ROOT / "manifests" / "class_conditioned.parquet").to_pylist()
    assert {r["num_images"] for r in cls} == {2} and len({(r["animal"], r["place"]) for r in cls}) == len(cls)
    assert all(r["prompt"] == f"a photo of a {r['animal']} in {r['place']}" for r in cls)

    sizes = pq.read_table(ROOT / "manifests" / "mixed_sizes.parquet").to_pylist()
    assert len({(r["width"], r["height"]) for r in sizes}) >= 5

    comparison = pq.read_table(ROOT / "manifests" / "scheduler_comparison.parquet").to_pylist()
    by_prompt = {}
    for r in comparison:
        by_prompt.setdefault(r["prompt"], []).append((r["scheduler"], r["seed"]))
    for variants in by_prompt.values():
        assert sorted(s for s, _ in variants) == sorted(NAMES) and len({seed for _, seed in variants}) == 1
    assert len({variants[0][1] for variants in by_prompt.values()}) == len(by_prompt)
    for r in cls + comparison:
        assert 25 <= r["steps"] <= 50

    modes = pq.read_table(ROOT / "manifests" / "modes.parquet").to_pylist()
    assert {(r["width"], r["height"], r["steps"]) for r in modes} == {(64, 64, 8)}
    img2img = [r for r in modes if r["init_image"] and not r["mask_image"]]
    assert len({r["strength"] for r in img2img}) >= 2
    assert any(r["mask_image"] for r in modes) and any(not r["init_image"] and not r["loras"] for r in modes)
    assert len({r["loras"] for r in modes if r["loras"]}) >= 2
    assert any("<toy>" in r["prompt"] for r in modes)
