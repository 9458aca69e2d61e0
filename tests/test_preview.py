"""`sdbatch preview`: which images a contact sheet shows (order, --n, --where), its layout, the
--where language and its errors, datasets on other file systems, and the command's exit codes."""
import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from jobs import preview as pv
from jobs.manifest import Defaults, open_manifest
from jobs.plan import read_shard, shards
from jobs.sink import ImageWriter, JobSpec, Output, ShardWriter

SHARD_SIZE = 3
ROWS = [  # (id, prompt, scheduler, steps, label, num_images)
    ("r0", "a red square", "ddim", 10, "a", 1),
    ("r1", "a green square, which has a rather long prompt that needs more than two caption lines to show", "euler", 20, "b", 2),
    ("r2", "a blue square", "ddim", 30, "a", 1),
    ("r3", "a yellow square", "pndm", 40, "c", 1),
    ("r4", "a cyan square", "ddim", 50, None, 1),
    ("r5", "a magenta square", "euler", 60, "b", 1),
    ("r6", "a white square", "ddim", 70, "a", 1),
]
IMAGE_IDS = ["r0", "r1-0", "r1-1", "r2", "r3", "r4", "r5", "r6"]  # in shard, then row order


def colour(image_id: str) -> tuple[int, int, int]:
    """A distinct solid colour per image, far from the sheet's background."""
    k = IMAGE_IDS.index(image_id)
    return 60 + 20 * k, 255 - 25 * k, (97 * k) % 200 + 50


def make_dataset(url: str, *, done=None, size=(24, 16)) -> Output:
    """What `sdbatch run` leaves behind, written with jobs.sink (no Ray, no model): solid-colour PNGs."""
    manifest = f"memory://preview-manifests/{abs(hash(url))}.parquet"
    table = pa.table({name: [r[i] for r in ROWS] for i, name in enumerate(["id", "prompt", "scheduler", "steps", "label", "num_images"])})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fsspec.filesystem("memory").pipe_file(manifest, buf.getvalue())
    out = Output(url)
    defaults = Defaults()  # the metadata says 512x512; the pixels are small, to keep the test fast
    with open_manifest(manifest) as m:
        out.prepare(JobSpec(manifest=manifest, manifest_fingerprint=m.fingerprint(), model="builtin:tiny", model_fingerprint="f",
                            rows=m.num_rows, images=len(IMAGE_IDS), shard_size=SHARD_SIZE, defaults=defaults, dtype="fp32"))
        with ImageWriter(out) as writer:
            for shard in shards(m.num_rows, SHARD_SIZE):
                if done is not None and shard.id not in done:
                    continue
                rows = read_shard(m, shard, defaults)
                w = ShardWriter(out, writer, rows, job=out.read_job(), model="builtin:tiny", model_fingerprint="f")
                for item in rows.items:
                    w.add(item, np.full((size[1], size[0], 3), colour(item.id), np.uint8), scheduler_config={}, seconds=0.1)
                w.commit()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("preview") / "out")
    make_dataset(path)
    return path


def shown(sheet: Image.Image, count_tiles: int, columns: int, thumb: int) -> list:
    """The image id shown in each tile, by the tile's centre colour (None: an empty tile, '?': not an image)."""
    grid = pv.grid(count_tiles, columns, thumb)
    assert sheet.size == grid.size
    pixels = np.asarray(sheet)
    found = []
    for i in range(grid.rows * grid.cols):
        x0, y0, x1, y1 = grid.thumb_box(i)
        centre = tuple(int(v) for v in pixels[(y0 + y1) // 2, (x0 + x1) // 2])
        tile = pixels[y0:y1, x0:x1]
        if (tile == pv.BACKGROUND).all():
            found.append(None)
        else:
            found.append(next((k for k in IMAGE_IDS if max(abs(a - b) for a, b in zip(colour(k), centre)) <= 2), "?"))
    return found


def test_sheet_shows_the_first_images_in_shard_and_row_order(dataset, tmp_path):
    sheet = tmp_path / "grid.png"
    assert pv.preview(dataset, str(sheet), columns=3, thumb_size=64) == 8
    image = Image.open(sheet)
    assert image.format == "PNG"
    assert shown(image.convert("RGB"), 8, 3, 64) == IMAGE_IDS + [None]  # 3 x 3 tiles, the last empty
    assert pv.preview(dataset, str(sheet), n=5, columns=8, thumb_size=48) == 5
    assert shown(Image.open(sheet).convert("RGB"), 5, 8, 48) == IMAGE_IDS[:5]  # one row of 5 columns


@pytest.mark.parametrize("where, expected", [
    ("scheduler == 'ddim'", ["r0", "r2", "r4", "r6"]),
    ('scheduler != "ddim" and steps < 50', ["r1-0", "r1-1", "r3"]),
    ("steps >= 40 or label == 'a'", ["r0", "r2", "r3", "r4", "r5", "r6"]),
    ("not (label in ('a', 'b',)) ", ["r3"]),  # a null label matches neither in nor not in
    ("label not in ('a') AND seed > -1", ["r1-0", "r1-1", "r3", "r5"]),
    ("`id` in ('r1-1', 'r6') or prompt == 'a blue square'", ["r1-1", "r2", "r6"]),
    ("guidance_scale == 7.5 and width <= 512e0 and steps > 65", ["r6"]),
])
def test_where_filters(dataset, tmp_path, where, expected):
    sheet = tmp_path / "grid.png"
    assert pv.preview(dataset, str(sheet), where=where, columns=4, thumb_size=32) == len(expected)
    assert [t for t in shown(Image.open(sheet).convert("RGB"), len(expected), 4, 32) if t] == expected


def test_captions_and_aspect_ratio(tmp_path):
    out = make_dataset(str(tmp_path / "wide"), size=(96, 64))
    sheet = tmp_path / "grid.png"
    pv.preview(out.url, str(sheet), n=2, columns=2, thumb_size=120)
    pixels = np.asarray(Image.open(sheet).convert("RGB"))
    grid = pv.grid(2, 2, 120)
    x0, y0, x1, y1 = grid.thumb_box(0)
    # a 3:2 image fills the box's width and is centred vertically: 80 rows of colour
    column = pixels[y0:y1, (x0 + x1) // 2]
    assert ((column == colour("r0")).all(axis=1)).sum() == 80
    # a caption of light text under each thumbnail, none under nothing
    caption = pixels[y1 + 1: y1 + 2 + pv.CAPTION_LINES * grid.line, x0:x1]
    assert (caption.max(axis=2) > 200).sum() > 50
    # the title line names the dataset
    assert (pixels[pv.PAD: pv.PAD + grid.line].max(axis=2) > 200).sum() > 50


def test_caption_text_fits_its_tile():
    font = pv._font()
    lines = pv._wrap(ROWS[1][1], font, 100, 2)
    assert len(lines) == 2 and lines[1].endswith("...")
    assert all(font.getlength(line) <= 100 for line in lines)
    assert pv._fit("short", font, 100) == "short"
    assert pv._wrap("", font, 100, 2) == []


def test_unfinished_dataset_shows_done_shards_only(tmp_path):
    out = make_dataset(str(tmp_path / "partial"), done={"shard-000001"})
    sheet = tmp_path / "grid.png"
    assert pv.preview(out.url, str(sheet), columns=4, thumb_size=32) == 3
    assert shown(Image.open(sheet).convert("RGB"), 3, 4, 32) == ["r3", "r4", "r5"]


def test_missing_image_gets_a_placeholder_tile(tmp_path):
    out = make_dataset(str(tmp_path / "broken"))
    (tmp_path / "broken" / "images" / "shard-000000" / "r0.png").unlink()
    sheet = tmp_path / "grid.png"
    assert pv.preview(out.url, str(sheet), n=2, columns=2, thumb_size=32) == 2
    pixels = np.asarray(Image.open(sheet).convert("RGB"))
    grid = pv.grid(2, 2, 32)
    x0, y0, x1, y1 = grid.thumb_box(0)
    assert tuple(pixels[y0, x0]) == pv.DIM  # the placeholder's outline
    assert shown(Image.open(sheet).convert("RGB"), 2, 2, 32) == ["?", "r1-0"]


def test_damaged_metadata_is_left_out_and_named(tmp_path, capsys):
    out = make_dataset(str(tmp_path / "damaged"))
    (tmp_path / "damaged" / "metadata" / "shard-000000.parquet").write_bytes(b"PAR1 cut off")
    sheet = tmp_path / "grid.png"
    assert pv.preview(out.url, str(sheet), columns=4, thumb_size=32) == 4  # shard 0's r0, r1-0, r1-1, r2 left out
    assert shown(Image.open(sheet).convert("RGB"), 4, 4, 32) == ["r3", "r4", "r5", "r6"]
    err = capsys.readouterr().err
    assert err.startswith("sdbatch: warning: left out metadata/shard-000000.parquet: not a readable Parquet file")
    assert err.rstrip().endswith("the next `sdbatch run` redoes its shard")
    for f in (tmp_path / "damaged" / "metadata").iterdir():
        f.write_bytes(b"")
    with pytest.raises(pv.PreviewError, match="every finished shard's metadata is damaged"):
        pv.preview(out.url, str(sheet))


def test_dataset_and_sheet_through_fsspec(tmp_path):
    make_dataset("memory://preview-remote/out")
    assert pv.preview("memory://preview-remote/out", "memory://preview-remote/sheet.jpg", where="label == 'b'",
                      columns=4, thumb_size=32) == 3
    data = fsspec.filesystem("memory").cat_file("/preview-remote/sheet.jpg")
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    fsspec.filesystem("memory").rm("/preview-remote", recursive=True)


# ------------------------------------------------------------------------------------- --where

SCHEMA = pa.schema([("id", pa.string()), ("seed", pa.int64()), ("steps", pa.int32()), ("scheduler", pa.string()),
                    ("guidance_scale", pa.float64()), ("flag", pa.bool_()), ("tags", pa.list_(pa.string())), ("my col", pa.string())])
TABLE = pa.table({"id": ["a", "b", "c"], "seed": [1, 2, 3], "steps": pa.array([10, 20, None], pa.int32()),
                  "scheduler": ["ddim", "o'neil", "pndm"], "guidance_scale": [1.0, 7.5, 9.0], "flag": [True, False, True],
                  "tags": [["x"], [], None], "my col": ["p", "q", "r"]}, schema=SCHEMA)


@pytest.mark.parametrize("where, ids", [
    ("steps == 10", ["a"]),
    ("steps != 10", ["b"]),  # null steps match nothing
    ("steps > 5 and guidance_scale < 8", ["a", "b"]),
    ("scheduler == 'o\\'neil'", ["b"]),
    ('scheduler == "o\'neil"', ["b"]),
    ("flag == true OR seed in (2)", ["a", "b", "c"]),
    ("not flag == true", ["b"]),
    ("`my col` >= 'q'", ["b", "c"]),
    ("((seed < 3)) and not (id == 'a' or id == 'z')", ["b"]),
    ("guidance_scale > -1.5e-3", ["a", "b", "c"]),
    ("id not in ('a', 'c')", ["b"]),
])
def test_where_language(where, ids):
    assert TABLE.filter(pv.parse_where(where, SCHEMA)).column("id").to_pylist() == ids


@pytest.mark.parametrize("where, message", [
    ("shceduler == 'ddim'", "no column 'shceduler'; did you mean 'scheduler'? (columns: id, seed, steps,"),
    ("scheduler = 'ddim'", "'=' at position 10 is not an operator; compare with =="),
    ("scheduler == 'ddim", "unterminated string starting at position 13"),
    ("scheduler == ddim", "expected a value ('text', a number, true or false), got 'ddim' at position 13"),
    ("scheduler == 3", "column 'scheduler' holds text, but 3 is a number; put text in quotes"),
    ("steps == '3'", "column 'steps' holds numbers, but '3' is text"),
    ("flag == 1", "column 'flag' holds booleans, but 1 is a number"),
    ("tags == 'x'", "; only text, numbers and booleans can be compared"),
    ("steps >", "expected a value ('text', a number, true or false), got the end"),
    ("steps 3", "expected a comparison (== != < <= > >=) or 'in' after 'steps', got '3' at position 6"),
    ("(steps == 3", "expected ')', got the end"),
    ("steps == 3)", "expected 'and', 'or' or the end, got ')' at position 10"),
    ("steps in 3", "expected '(' after 'in', got '3' at position 9"),
    ("steps not 3", "expected 'in (' after 'not'"),
    ("steps in (1 2)", "expected ',' or ')', got '2' at position 12"),
    ("== 3", "expected a column name, got '==' at position 0"),
    ("steps == 3 and", "expected a column name, got the end"),
    ("__import__('os').system('x') == 1", "unexpected '.' at position 16"),
    ("__import__ == 1", "no column '__import__'"),
    ("steps == 3; x", "unexpected ';' at position 10"),
    ("", "expected a column name, got the end"),
])
def test_where_errors(where, message):
    with pytest.raises(pv.PreviewError) as e:
        pv.parse_where(where, SCHEMA)
    assert message in str(e.value)
    assert str(e.value).startswith(f"--where {where!r}: ")


# -------------------------------------------------------------------------------------- errors

def test_not_a_dataset(tmp_path):
    with pytest.raises(pv.PreviewError, match=r"not an sdbatch dataset \(no _sdbatch/job.json\)"):
        pv.preview(str(tmp_path), str(tmp_path / "grid.png"))
    with pytest.raises(pv.PreviewError, match="not an sdbatch dataset"):
        pv.preview(str(tmp_path / "missing"), str(tmp_path / "grid.png"))


def test_no_finished_shards_no_matches_bad_arguments(dataset, tmp_path):
    empty = make_dataset(str(tmp_path / "empty"), done=set())
    sheet = tmp_path / "grid.png"
    with pytest.raises(pv.PreviewError, match="no finished shards yet"):
        pv.preview(empty.url, str(sheet))
    with pytest.raises(pv.PreviewError, match=r"no images match --where \"scheduler == 'lms'\""):
        pv.preview(dataset, str(sheet), where="scheduler == 'lms'")
    with pytest.raises(pv.PreviewError, match="cannot tell the image format from the name; use .png or .jpg"):
        pv.preview(dataset, str(tmp_path / "grid.nope"))
    with pytest.raises(pv.PreviewError, match="--n and --columns must be at least 1"):
        pv.preview(dataset, str(sheet), n=0)
    assert not sheet.exists()


# ------------------------------------------------------------------------------------- command

def cli() -> typer.Typer:
    """The sdbatch app with the command registered the way jobs/cli.py registers it."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        pass

    app.command("preview")(pv.preview_command)
    return app


def test_command(dataset, tmp_path):
    sheet = tmp_path / "grid.png"
    r = CliRunner().invoke(cli(), ["preview", dataset, "-o", str(sheet), "--n", "3", "--where", "steps > 10", "--columns", "2"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {sheet}: 3 images\n"
    assert shown(Image.open(sheet).convert("RGB"), 3, 2, 160) == ["r1-0", "r1-1", "r2", None]


def test_command_user_errors_exit_2(dataset, tmp_path):
    r = CliRunner().invoke(cli(), ["preview", dataset, "-o", str(tmp_path / "g.png"), "--where", "steps = 3"])
    assert r.exit_code == 2
    assert r.stderr == "sdbatch: error: --where 'steps = 3': '=' at position 6 is not an operator; compare with ==\n"
    r = CliRunner().invoke(cli(), ["preview", str(tmp_path), "-o", str(tmp_path / "g.png")])
    assert r.exit_code == 2 and r.stderr.startswith("sdbatch: error: ") and "not an sdbatch dataset" in r.stderr
