"""`sdbatch manifest build`: a validated Parquet manifest from the prompts people already have.

The rows come from one SOURCE file or from a template:

  .txt          one prompt a line; surrounding whitespace is stripped; blank lines and lines
                starting with `#` are skipped (a prompt that starts with `#` needs CSV or JSONL)
  .csv / .tsv   a header row, then one record a row (RFC 4180 quoting, UTF-8, a BOM is fine),
                read by pyarrow.csv; it needs a `prompt` column, or `--prompt-column NAME`.
                Parameter columns are read in their manifest types (an empty cell is a null,
                i.e. the job's default), the other columns stay strings — JSONL keeps JSON's
                own types
  .jsonl        one JSON object a line, read by pyarrow.json; keys are columns (a missing key
                is a null); parameters are read in their manifest types
  --template T  with one `--values NAME=...` per placeholder `{NAME}`: the cross product of the
                lists, each value also kept in its own column NAME — the labels a
                class-conditioned dataset needs ({{ and }} are literal braces)

The format comes from the extension (after a compression suffix such as .gz) or `--format`.
Files may be any fsspec URL. `--values NAME=a,b,c` lists values inline (a comma makes it
inline: `NAME=cat,` is one value); `--values NAME=FILE` reads them from a file, one a line,
like a .txt source.

Then, in this order:

  sweeps    `--values P=...` for a parameter column P that is not a placeholder (scheduler,
            steps, seed, guidance_scale, width, height, negative_prompt, num_images): every row
            once per value, the variants of a row adjacent
  seed      `--seed S` writes seed = jobs.manifest.derive_seed(S, id) where a row has none,
            taking the row's id from *before* the sweeps: the seed `sdbatch run --seed S` would
            derive, written down, and shared by the variants of a row (a scheduler comparison
            compares like with like). Without --seed, the job derives seeds from its own --seed.
  --set     `--set K=V` and `--num-images N` put V in every row; a column the source already
            has keeps its values and only its nulls are filled
  id        the source's `id` column, else the row number — written out, so a manifest that is
            later filtered or concatenated keeps its ids and hence its derived seeds

Rows are in source order; the cross product runs like nested loops, the first `--values`
outermost, placeholders before sweeps. Parameters (CSV cells, JSON values, `--set`, `--values`)
become int64 for seed, steps, width, height and num_images ("30", "30.0" and 30.0 are 30; 30.5
is an error), float64 for guidance_scale and strength, strings for prompt, negative_prompt, scheduler and the rest;
other columns given as text stay strings (a `--set` on a typed JSONL column takes the column's
type). Errors name the file and, where pyarrow reports it, the row.

The whole table is built in memory (Arrow columns, about the size of the text) and checked with
jobs.manifest.validate before it is written in one atomic write: a failed build leaves no
half-written or invalid manifest behind.
"""
import io
import math
import posixpath
import re
import string
import uuid
from typing import Annotated

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import typer

from jobs import manifest as manifests
from jobs import storage
from jobs.cli_common import StorageOptions, storage_options, user_errors
from jobs.manifest import ManifestError

FORMATS = ("txt", "csv", "tsv", "jsonl")
EXTENSIONS = {".txt": "txt", ".text": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
INT_PARAMS = ("seed", "steps", "width", "height", "num_images")
FLOAT_PARAMS = ("guidance_scale", "strength")
SWEEPABLE = tuple(p for p in manifests.PARAMS if p not in ("id", "prompt"))
ROW_GROUP_ROWS = 65_536  # an actor decodes whole row groups to read its shard: keep them modest
# Integer parameters are read as decimals and then cast safely to int64: "30", "30.0" and "3e1"
# are 30, "30.5" is an error, and 63-bit seeds stay exact (float64 would round them).
DECIMAL = pa.decimal128(38, 10)
# pyarrow.csv's error for a cell it cannot convert: the column's index, the record, the cell
CSV_CELL_ERROR = re.compile(r"In CSV column #(\d+): Row #(\d+): .*?'(.*)'")


def build(
    output: str,
    source: str | None = None,
    *,
    fmt: str | None = None,
    prompt_column: str | None = None,
    template: str | None = None,
    values: list[str] = (),
    num_images: int | None = None,
    seed: int | None = None,
    sets: list[str] = (),
    storage_options: dict | None = None,
) -> manifests.Summary:
    """Build the manifest, validate it, write it to `output`; returns the validation summary."""
    if source is not None and template is not None:
        raise ManifestError("give either a SOURCE file or --template, not both")
    if source is None and template is None:
        raise ManifestError("nothing to build from: give a SOURCE file (.txt, .csv, .tsv, .jsonl) or --template")
    if prompt_column is not None and source is None:
        raise ManifestError("--prompt-column names a column of a CSV or JSONL source, not of --template")
    if seed is not None and not 0 <= seed < manifests.MAX_SEED:
        raise ManifestError(f"--seed {seed} is out of range 0..2^63-1")
    out_fs, out_path = storage.resolve(output, storage_options)
    dims = _parse_values(values, storage_options)
    constants = _parse_sets(sets, num_images)

    made = {}  # column -> the option that made it (which --set must not contradict)
    if template is not None:
        placeholders = _placeholders(template)
        missing = [p for p in placeholders if p not in dims]
        if missing:
            raise ManifestError(f"--template has {{{missing[0]}}} but no --values {missing[0]}=... to fill it")
        base = _fill_template(template, [(name, *dims.pop(name)) for name in list(dims) if name in placeholders])
        made.update((name, f"--values {name}=...") for name in placeholders)
    else:
        src_fs, src_path = storage.resolve(source, storage_options)
        if type(src_fs) is type(out_fs) and src_path == out_path:
            raise ManifestError(f"-o {storage.redact_url(output)} is the SOURCE file; write the manifest elsewhere")
        base = _read_source(source, src_fs, src_path, fmt, prompt_column)
        if base.num_rows == 0:
            raise ManifestError(f"{storage.redact_url(source)}: no prompts in it")
    source_ids = "id" in base.column_names

    sweeps = [(name, column) for name, (column, _) in dims.items()]  # the --values that fill no placeholder
    for name, _ in sweeps:
        if name not in SWEEPABLE:
            what = f"the template has no {{{name}}} placeholder" if template is not None else "it is not a parameter column"
            raise ManifestError(f"--values {name}=...: {what}; --values fill placeholders or sweep a parameter "
                                f"({', '.join(SWEEPABLE)})")
        if name in base.column_names:
            raise ManifestError(f"--values {name}=...: the source already has a {name!r} column")
        made[name] = f"--values {name}=..."
    if sweeps and source_ids:
        raise ManifestError("--values sweeps repeat every row, and the source's 'id' column would repeat with them; "
                            "remove or rename the 'id' column (the ids become row numbers)")

    if seed is not None:
        if "seed" in made:
            raise ManifestError(f"--seed and {made['seed']} both give the seeds; use one")
        given = manifests.column(base, "seed")
        given = [None] * base.num_rows if given is None else given.to_pylist()
        derived = [manifests.derive_seed(seed, rid) if s is None else s for rid, s in zip(manifests.row_ids(base, 0), given)]
        base = _put(base, "seed", pa.array(derived, pa.int64()))
        made["seed"] = "--seed"

    outer, picks = _product(base.num_rows, [len(column) for _, column in sweeps])
    table = base.take(outer)
    for (name, column), pick in zip(sweeps, picks):
        table = table.append_column(name, column.take(pick))
    for name, value in constants.items():
        table = _put(table, name, _constant(table, name, value, made))
    if not source_ids:
        table = _put(table, "id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    table = table.select(["id", "prompt", *(n for n in table.column_names if n not in ("id", "prompt"))])

    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    data = buf.getvalue()
    summary = _validate(data, storage.redact_url(output))
    storage.write_atomic(out_fs, out_path, data)
    return summary


def _constant(table: pa.Table, name: str, value: pa.Scalar, made: dict[str, str]) -> pa.ChunkedArray:
    """Column `name` after `--set name=value`: the value everywhere, or in the nulls of a source column."""
    shown = f"--set {name}={value.as_py()}"
    if name in made:
        raise ManifestError(f"{shown}: the column comes from {made[name]}; use one")
    if name not in table.column_names:
        return pa.chunked_array([pa.repeat(value, table.num_rows)])
    column = table.column(name)
    if pa.types.is_null(column.type):
        return column.cast(value.type).fill_null(value)
    try:
        return column.fill_null(value.cast(column.type))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ManifestError(f"{shown}: the source's {name!r} column holds {column.type}") from None


def _validate(data: bytes, name: str) -> manifests.Summary:
    """jobs.manifest.validate on the finished bytes, before they are written anywhere for real. The
    LoRAs a job declares and the image files are checked by `validate` and `run`, which know them."""
    url = f"memory://sdbatch-build-{uuid.uuid4().hex}/manifest.parquet"
    try:
        fsspec.filesystem("memory").pipe_file(url, data)
        with manifests.open_manifest(url) as m:
            summary = manifests.validate(m, manifests.Defaults(), lora_names=None, check_files=False)
    except ManifestError as e:
        raise ManifestError(str(e).replace(url, name)) from None
    finally:
        fsspec.filesystem("memory").rm(url.rsplit("/", 1)[0], recursive=True)
    summary.manifest = name
    return summary


# ---------------------------------------------------------------------------------------- sources

def _read_source(url: str, fs, path: str, fmt: str | None, prompt_column: str | None) -> pa.Table:
    name = storage.redact_url(url)
    if fmt is None:
        stem = path[: -len(posixpath.splitext(path)[1])] if fsspec.utils.infer_compression(path) else path
        fmt = EXTENSIONS.get(posixpath.splitext(stem)[1].lower())
        if fmt is None:
            raise ManifestError(f"{name}: cannot tell the format from the file name; pass --format ({', '.join(FORMATS)})")
    elif fmt not in FORMATS:
        raise ManifestError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if prompt_column is not None and fmt == "txt":
        raise ManifestError("--prompt-column names a column of a CSV or JSONL source; a text file is all prompts")
    data = _read_bytes(fs, path, name)
    if fmt == "txt":
        return pa.table({"prompt": pa.array(_lines(data), pa.string())})
    table = _read_jsonl(data, name) if fmt == "jsonl" else _read_csv(data, name, "\t" if fmt == "tsv" else ",")
    columns = table.column_names
    if prompt_column is not None:
        if prompt_column not in columns:
            raise ManifestError(f"{name}: --prompt-column {prompt_column!r}: no such column (columns: {', '.join(columns)})")
        if prompt_column != "prompt":
            if "prompt" in columns:
                raise ManifestError(f"{name}: has a 'prompt' column besides --prompt-column {prompt_column!r}; rename one")
            table = table.rename_columns(["prompt" if c == prompt_column else c for c in columns])
    elif "prompt" not in columns:
        raise ManifestError(f"{name}: no 'prompt' column (columns: {', '.join(columns) or 'none'}); "
                            "name the column that holds the prompts with --prompt-column NAME")
    return table


def _read_bytes(fs, path: str, name: str, missing_hint: str = "") -> bytes:
    """A whole file, decompressed by its extension, checked to be UTF-8 text (a BOM is dropped)."""
    try:
        with fs.open(path, "rb", compression="infer") as f:
            data = f.read()
    except FileNotFoundError:
        raise ManifestError(f"{name}: no such file{missing_hint}") from None
    except IsADirectoryError:
        raise ManifestError(f"{name}: is a directory, not a file") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(f"{name}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return data


def _lines(data: bytes) -> list[str]:
    """Stripped lines, without blank lines and `#` comments. Only '\\n' ends a line (not the
    other characters str.splitlines() knows, which a prompt may hold)."""
    stripped = (line.strip() for line in data.decode("utf-8").split("\n"))
    return [line for line in stripped if line and not line.startswith("#")]


def _read_csv(data: bytes, name: str, delimiter: str) -> pa.Table:
    """pyarrow.csv with the manifest's types: DECIMAL for the integer parameters (then int64),
    float64 for guidance_scale and strength, text for every other column; an empty cell is a null parameter
    but an empty string elsewhere (an empty prompt is a prompt)."""
    if not data.strip():
        raise ManifestError(f"{name}: empty file (a header row naming the columns comes first)")
    read = pa_csv.ReadOptions(use_threads=False)  # one thread: pyarrow's errors then name the row
    parse = pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    try:
        header = pa_csv.open_csv(io.BytesIO(data), read_options=read, parse_options=parse).schema.names
        names = [h.strip() for h in header]
        for i, h in enumerate(names):
            if not h:
                raise ManifestError(f"{name}: column {i + 1} of the header has no name")
            if names.count(h) > 1:
                raise ManifestError(f"{name}: column {h!r} appears {names.count(h)} times in the header")
        types = {raw: DECIMAL if h in INT_PARAMS else pa.float64() if h in FLOAT_PARAMS else pa.string()
                 for raw, h in zip(header, names)}
        convert = pa_csv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=False)
        table = pa_csv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        cell = CSV_CELL_ERROR.match(str(e))
        if cell is None or int(cell[1]) >= len(header):
            raise ManifestError(f"{name}: {e}") from None
        column = names[int(cell[1])]
        row = int(cell[2]) - 2  # pyarrow counts records from 1, the header first; manifest rows count from 0
        raise ManifestError(f"{name}: column {column!r}: {cell[3]!r} (row {row}) is not "
                            f"{'an integer' if column in INT_PARAMS else 'a number'}") from None
    table = table.rename_columns(names)
    for h in names:
        if h in manifests.PARAMS and h != "prompt" and pa.types.is_string(table.column(h).type):
            column = table.column(h)
            table = _put(table, h, pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column))
    return _integers(table, name)


def _read_jsonl(data: bytes, name: str) -> pa.Table:
    """pyarrow.json: a first read finds the keys, the second reads the parameters among them in
    the manifest's types (DECIMAL, then int64, for the integer ones); other keys keep JSON's types."""
    if not data.strip():
        return pa.table({"prompt": pa.array([], pa.string())})
    read = pa_json.ReadOptions(use_threads=False, block_size=max(len(data), 1 << 20))  # one block: a line never straddles two
    try:
        keys = pa_json.read_json(io.BytesIO(data), read_options=read).column_names
        schema = pa.schema([(k, DECIMAL if k in INT_PARAMS else pa.float64() if k in FLOAT_PARAMS else pa.string())
                            for k in keys if k in manifests.PARAMS and k != "id"])
        parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
        table = pa_json.read_json(io.BytesIO(data), read_options=read, parse_options=parse)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise ManifestError(f"{name}: {e}") from None
    return _integers(table.select(keys), name)


def _integers(table: pa.Table, origin: str) -> pa.Table:
    """The DECIMAL columns as int64; a value with a fraction or out of range is an error naming it."""
    for name in table.column_names:
        column = table.column(name)
        if column.type != DECIMAL:
            continue
        try:
            table = _put(table, name, column.cast(pa.int64()))
        except pa.ArrowInvalid:
            row, bad = next((i, v) for i, v in enumerate(column.to_pylist())
                            if v is not None and (v % 1 or not -2**63 <= v < 2**63))
            problem = "is not an integer" if bad % 1 else "does not fit a 64-bit integer"
            raise ManifestError(f"{origin}: column {name!r}: {bad.normalize():f} (row {row}) {problem}") from None
    return table


def _from_text(name: str, texts: pa.Array, origin: str) -> pa.Array:
    """Parameter values given as text (--values, --set) in the manifest's type; surrounding
    whitespace is dropped, and a blank is a null."""
    texts = pc.utf8_trim_whitespace(texts)
    texts = pc.if_else(pc.equal(texts, ""), pa.scalar(None, pa.string()), texts)
    target = DECIMAL if name in INT_PARAMS else pa.float64() if name in FLOAT_PARAMS else None
    if target is None:
        return texts
    try:
        numbers = texts.cast(target)
    except pa.ArrowInvalid:
        row = next(i for i, t in enumerate(texts.to_pylist()) if t is not None and not _casts(t, target))
        raise ManifestError(f"{origin}: column {name!r}: {texts[row].as_py()!r} (row {row}) is not "
                            f"{'an integer' if target == DECIMAL else 'a number'}") from None
    return _integers(pa.table({name: numbers}), origin).column(0).combine_chunks()


def _casts(text: str, target: pa.DataType) -> bool:
    try:
        pa.scalar(text).cast(target)
    except pa.ArrowInvalid:
        return False
    return True


# ------------------------------------------------------------------------------ templates, values

def _placeholders(template: str) -> list[str]:
    """The distinct `{name}` fields of a template, in order."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ManifestError(f"--template {template!r}: {e}; write {{{{ and }}}} for literal braces") from None
    names = []
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ManifestError(f"--template {template!r}: placeholders are plain {{name}}, got "
                                f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}")
        if name in ("id", "prompt"):
            raise ManifestError(f"--template {template!r}: {{{name}}} cannot be a placeholder; the builder makes {name!r} itself")
        if name not in names:
            names.append(name)
    return names


def _fill_template(template: str, dims: list[tuple[str, pa.Array, list[str]]]) -> pa.Table:
    """The cross product of the placeholders' values: the prompt they fill, and one column each."""
    parts = list(string.Formatter().parse(template))  # (literal text, placeholder or None, ...)
    if not dims:
        return pa.table({"prompt": pa.array(["".join(literal for literal, *_ in parts)], pa.string())})
    _, picks = _product(1, [len(texts) for _, _, texts in dims])
    texts = {name: pa.array(t, pa.string()).take(pick) for (name, _, t), pick in zip(dims, picks)}
    pieces = []
    for literal, name, _, _ in parts:
        if literal:
            pieces.append(pa.scalar(literal))
        if name is not None:
            pieces.append(texts[name])
    columns = {"prompt": pc.binary_join_element_wise(*pieces, "")}
    columns.update((name, column.take(pick)) for (name, column, _), pick in zip(dims, picks))
    return pa.table(columns)


def _parse_values(specs: list[str], storage_options: dict | None) -> dict[str, tuple[pa.Array, list[str]]]:
    """`NAME=a,b,c` or `NAME=FILE` options → {name: (column, values as text)}, in the order given."""
    dims = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ManifestError(f"--values {spec!r}: expected NAME=a,b,c or NAME=FILE")
        if name in dims:
            raise ManifestError(f"--values {name}=... is given twice")
        if "," in text:
            items = [v.strip() for v in text.split(",") if v.strip()]
        else:
            url = text.strip()
            if not url:
                raise ManifestError(f"--values {spec!r}: no values after '='")
            fs, path = storage.resolve(url, storage_options)
            hint = f" (for values on the command line, separate them with commas: {name}=cat,dog)"
            items = _lines(_read_bytes(fs, path, f"--values {name}={storage.redact_url(url)}", missing_hint=hint))
        if not items:
            raise ManifestError(f"--values {spec}: no values (a file needs non-blank, non-comment lines)")
        dups = sorted({v for v in items if items.count(v) > 1})
        if dups:
            raise ManifestError(f"--values {name}: {', '.join(map(repr, dups[:5]))} appear{'s' if len(dups) == 1 else ''} "
                                "more than once; each value makes a row, so a repeat would skew the dataset")
        text = pa.array(items, pa.string())
        dims[name] = (_from_text(name, text, f"--values {name}") if name in manifests.PARAMS else text, items)
    return dims


def _parse_sets(specs: list[str], num_images: int | None) -> dict[str, pa.Scalar]:
    """`KEY=VALUE` options (and --num-images) → typed scalars."""
    constants = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ManifestError(f"--set {spec!r}: expected KEY=VALUE")
        if key in ("id", "prompt"):
            raise ManifestError(f"--set {key}=...: the builder makes {key!r} itself")
        if key in constants:
            raise ManifestError(f"--set {key}=... is given twice")
        if key in manifests.PARAMS:
            constants[key] = _from_text(key, pa.array([text], pa.string()), f"--set {key}")[0]
            if not constants[key].is_valid:
                raise ManifestError(f"--set {spec!r}: no value after '='")
        else:
            constants[key] = pa.scalar(text, pa.string())
    if num_images is not None:
        if "num_images" in constants:
            raise ManifestError("--num-images and --set num_images=... both given; use one")
        constants["num_images"] = pa.scalar(num_images, pa.int64())
    return constants


def _product(rows: int, sizes: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Indices of nested loops over `rows` (outermost), then each of `sizes` (the last innermost):
    (the outer index of every result row, the index into each size's values)."""
    inner = math.prod(sizes)
    r = np.arange(rows * inner, dtype=np.int64)
    picks, stride = [], inner
    for size in sizes:
        stride //= size
        picks.append((r // stride) % size)
    return r // inner, picks


def _put(table: pa.Table, name: str, column) -> pa.Table:
    """Replace column `name`, or append it."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


# ------------------------------------------------------------------------------------ the command

manifest_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None, help="Build manifests from prompt lists and templates.")


@manifest_app.command("build")
@user_errors
def build_command(
    output: Annotated[str, typer.Option("-o", "--output", help="Where to write the Parquet manifest (path or fsspec URL).",
                                        show_default=False)],
    source: Annotated[str | None, typer.Argument(
        metavar="SOURCE", help="Prompts: .txt (one a line), .csv/.tsv (a 'prompt' column), .jsonl; a path or fsspec URL. "
             "Leave out with --template.", show_default=False)] = None,
    fmt: Annotated[str | None, typer.Option("--format", help=f"Source format ({', '.join(FORMATS)}); default: from the extension.",
                                           show_default=False)] = None,
    prompt_column: Annotated[str | None, typer.Option("--prompt-column", help="The CSV/JSONL column holding the prompts.",
                                                     show_default=False)] = None,
    template: Annotated[str | None, typer.Option("--template", help="A prompt template such as 'a photo of a {animal} in {place}'.",
                                                show_default=False)] = None,
    values: Annotated[list[str] | None, typer.Option(
        "--values", help="NAME=a,b,c or NAME=FILE (one value a line): fills {NAME} in the template, or sweeps "
                         "parameter NAME (e.g. scheduler=ddim,euler). Repeatable; the first is the outermost loop.",
        show_default=False)] = None,
    num_images: Annotated[int | None, typer.Option("--num-images", help="Images per row.", show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Write seed = derive_seed(SEED, id) into rows without one (what `sdbatch run --seed SEED` would "
                       "use); variants made by --values share their row's seed. Default: leave seeds to the job.",
        show_default=False)] = None,
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE: a column with VALUE in every row (e.g. steps=30, scheduler=ddim); repeatable.",
        show_default=False)] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Build a validated Parquet manifest from a prompt list (txt, CSV, JSONL) or a template with value lists."""
    summary = build(output, source, fmt=fmt, prompt_column=prompt_column, template=template, values=values or [],
                    num_images=num_images, seed=seed, sets=sets or [],
                    storage_options=storage_options(storage_option))
    typer.echo(f"wrote {summary.manifest}")
    typer.echo(summary.format())
