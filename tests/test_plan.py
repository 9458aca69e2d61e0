"""Shards, work items and batches: deterministic, lazy, and independent of how rows are cut."""
import hashlib
import itertools
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import images
from jobs.manifest import MAX_SEED, Defaults, derive_seed, open_manifest
from jobs.plan import (Shard, WorkItem, batches, count_shards, image_shards, is_shard_id, manifest_shards, read_shard,
                       shard_at, shard_id, shard_index, shards, work_items)


def test_shards_cover_the_rows_once_in_order():
    got = list(shards(23, 5))
    assert [(s.id, s.start, s.stop) for s in got] == [
        ("shard-000000", 0, 5), ("shard-000001", 5, 10), ("shard-000002", 10, 15),
        ("shard-000003", 15, 20), ("shard-000004", 20, 23),
    ]
    assert count_shards(23, 5) == 5 and count_shards(25, 5) == 5 and count_shards(1, 100) == 1
    assert shard_at(4, 23, 5) == Shard(4, 20, 23)
    with pytest.raises(IndexError):
        shard_at(5, 23, 5)


def test_skip_leaves_out_done_shards():
    assert [s.index for s in shards(10, 3, skip={"shard-000001", "shard-000003"})] == [0, 2]


def test_shard_ids():
    assert shard_id(42) == "shard-000042" and shard_index("shard-000042") == 42
    assert shard_id(1_234_567) == "shard-1234567" and shard_index("shard-1234567") == 1_234_567
    assert not is_shard_id("shard-00001x") and not is_shard_id(".shard-000001") and not is_shard_id("shard-")
    with pytest.raises(ValueError):
        shard_index("part-0")


def test_ten_million_rows_are_planned_lazily_with_flat_memory():
    assert [s.index for s in itertools.islice(shards(10_000_000, 1), 3)] == [0, 1, 2]
    tracemalloc.start()
    n = sum(1 for _ in shards(10_000_000, 100))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 100_000 and peak < 100_000


def table(**columns):
    n = len(next(iter(columns.values())))
    return pa.table({"prompt": [f"p{i}" for i in range(n)], **columns})


def test_work_items_fill_in_defaults_for_missing_and_null_values():
    defaults = Defaults(seed=3, steps=25, guidance_scale=5.0, width=256, height=320, scheduler="ddim", negative_prompt="blurry")
    t = table(steps=[10, None], negative_prompt=[None, "ugly"], seed=pa.array([None, 99], pa.int64()), scheduler=["euler", None])
    a, b = work_items(t, 40, defaults)
    assert a == WorkItem(id="40", row=40, k=0, prompt="p0", negative_prompt="blurry", seed=derive_seed(3, "40"),
                         steps=10, guidance_scale=5.0, width=256, height=320, scheduler="euler")
    assert b == WorkItem(id="41", row=41, k=0, prompt="p1", negative_prompt="ugly", seed=99,
                         steps=25, guidance_scale=5.0, width=256, height=320, scheduler="ddim")


def test_integral_float_columns_become_ints():
    (item,) = work_items(table(steps=[20.0], width=[512.0], seed=[7.0]), 0, Defaults())
    assert (item.steps, item.width, item.seed) == (20, 512, 7)
    assert type(item.steps) is int and type(item.seed) is int


def test_num_images_expands_ids_and_seeds():
    t = table(id=["cat", "dog", "owl"], num_images=[3, 1, 2], seed=pa.array([10, 5, MAX_SEED - 1], pa.uint64()))
    items = work_items(t, 0, Defaults())
    assert [(i.id, i.row, i.k, i.seed) for i in items] == [
        ("cat-0", 0, 0, 10), ("cat-1", 0, 1, 11), ("cat-2", 0, 2, 12),
        ("dog", 1, 0, 5),  # one image: the row id itself, no suffix
        ("owl-0", 2, 0, MAX_SEED - 1), ("owl-1", 2, 1, 0),  # seed + k wraps modulo 2^63
    ]


def test_seeds_do_not_depend_on_how_rows_are_sharded(tmp_path):
    path = str(tmp_path / "m.parquet")
    pq.write_table(table(id=[f"r{i}" for i in range(17)], num_images=[1, 2] * 8 + [1]), path, row_group_size=4)
    defaults = Defaults(seed=1234)
    with open_manifest(path) as m:
        whole = read_shard(m, Shard(0, 0, 17), defaults).items
        for k in (1, 3, 7):
            assert [i for s in shards(m.num_rows, k) for i in read_shard(m, s, defaults).items] == whole
    assert whole[0].seed == derive_seed(1234, "r0")
    assert len({i.seed for i in whole}) == len(whole)


def test_read_shard_keeps_pass_through_rows_aligned(tmp_path):
    path = str(tmp_path / "m.parquet")
    pq.write_table(table(label=[f"L{i}" for i in range(10)], steps=list(range(1, 11))), path, row_group_size=3)
    with open_manifest(path) as m:
        rows = read_shard(m, shard_at(1, 10, 4), Defaults())
    assert rows.passthrough.column_names == ["label"]
    assert [(i.row, i.steps, rows.passthrough["label"][i.row - rows.shard.start].as_py()) for i in rows.items] == [
        (4, 5, "L4"), (5, 6, "L5"), (6, 7, "L6"), (7, 8, "L7"),
    ]


def test_batches_group_by_shape_steps_scheduler_and_whether_guided():
    t = table(
        width=[512, 768, 512, 512, 512, 768, 512, 512],
        steps=[20, 20, 20, 30, 20, 20, 20, 20],
        scheduler=["ddim", "ddim", "ddim", "ddim", "ddim", "ddim", "euler", "ddim"],
        guidance_scale=[7.5, 7.5, 5.0, 7.5, 1.0, 7.5, 7.5, 0.5],
    )
    got = [[i.row for i in b] for b in batches(work_items(t, 0, Defaults()), batch_size=2)]
    assert got == [[0, 2], [1, 5], [3], [4, 7], [6]]  # guidance 7.5 and 5.0 share a batch; 1.0 and 0.5 too
    for b in batches(work_items(t, 0, Defaults()), 2):
        assert len({i.batch_key for i in b}) == 1


def test_batches_respect_the_size_and_keep_manifest_order():
    items = work_items(table(num_images=[5, 2]), 0, Defaults())
    assert [[i.id for i in b] for b in batches(items, 3)] == [["0-0", "0-1", "0-2"], ["0-3", "0-4", "1-0"], ["1-1"]]
    assert [[i.id for i in b] for b in batches(items, 100)] == [[i.id for i in items]]
    with pytest.raises(ValueError):
        batches(items, 0)


def test_batches_can_take_their_size_from_the_group():
    t = table(width=[512, 768, 512, 768, 512, 768, 512])
    rows = {512: 3, 768: 2}
    got = [[i.row for i in b] for b in batches(work_items(t, 0, Defaults()), lambda item: rows[item.width])]
    assert got == [[0, 2, 4], [6], [1, 3], [5]]
    with pytest.raises(ValueError, match="at least 1, got 0"):
        batches(work_items(t, 0, Defaults()), lambda item: 0)


def test_work_items_carry_image_references_strength_and_lora_sets():
    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    t = table(init_image=["in/a.png", "s3://b/c.png", None, None],
              mask_image=pa.array([None, {"bytes": b"mask", "path": "ignored.png"}, None, {"bytes": None, "path": "m.png"}],
                                  image_struct),
              strength=[None, 0.5, 0.3, None], loras=["owl:0.5,cat", None, "cat", ""])
    a, b, c, d = work_items(t, 0, Defaults(strength=0.7), base="/data")
    assert (a.mode, a.init_image, a.mask_image, a.strength, a.loras) == (
        "img2img", "/data/in/a.png", None, 0.7, (("cat", 1.0), ("owl", 0.5)))
    assert (b.mode, b.init_image, b.mask_image.to_pybytes(), b.strength) == ("inpaint", "s3://b/c.png", b"mask", 0.5)
    assert (c.mode, c.strength, c.loras) == ("txt2img", None, (("cat", 1.0),))  # no init image: strength unused
    assert d.mode == "txt2img" and d.mask_image == "/data/m.png"  # validate refuses such a row before any shard


def test_image_bytes_stay_in_the_shards_table_not_copied_per_image():
    t = table(init_image=pa.array([b"x" * 1000, b"y" * 1000], pa.binary()), num_images=[3, 1])
    items = work_items(t, 0, Defaults())
    data = t.column("init_image").chunk(0).buffers()[2]  # the binary column's value bytes
    assert {i.init_image.address for i in items[:3]} == {data.address}
    assert items[3].init_image.address == data.address + 1000 and items[3].init_image.to_pybytes() == b"y" * 1000


def test_batches_split_by_mode_strength_and_lora_set_but_not_by_unused_strength():
    t = table(init_image=[None, None, "a.png", "a.png", "a.png", "a.png", "a.png", None],
              mask_image=[None, None, None, None, "m.png", None, None, None],
              strength=[0.2, 0.9, 0.5, 0.5, 0.5, 0.6, 0.5, None],
              loras=[None, "", None, "", None, None, "cat:0.5", "cat:0.5"])
    items = work_items(t, 0, Defaults())
    assert [[i.row for i in b] for b in batches(items, 8)] == [[0, 1], [2, 3], [4], [5], [6], [7]]
    assert items[0].batch_key == ("txt2img", 512, 512, 50, "pndm", True, None, ())
    assert items[6].batch_key == ("img2img", 512, 512, 50, "pndm", True, 0.5, (("cat", 0.5),))


def test_read_shard_resolves_image_paths_against_the_manifests_folder(tmp_path):
    path = str(tmp_path / "m.parquet")
    pq.write_table(table(init_image=["imgs/a.png", "/abs/b.png"]), path)
    with open_manifest(path) as m:
        (rows,) = [read_shard(m, s, Defaults()) for s in manifest_shards(m, 4)]
    assert [i.init_image for i in rows.items] == [f"{tmp_path}/imgs/a.png", "/abs/b.png"]
    assert rows.passthrough.num_columns == 0  # image columns never pass through


def test_images_read_gives_the_bytes_and_their_sha256_from_files_uris_and_table_views(tmp_path):
    from fsspec.implementations.memory import MemoryFileSystem

    (tmp_path / "a.png").write_bytes(b"local")
    MemoryFileSystem().pipe("/inputs/b.png", b"remote")
    view = images.refs(pa.array([b"xxbytes"], pa.binary()).slice(0, 1), "", 1)[0]
    for ref, data in ((str(tmp_path / "a.png"), b"local"), ("memory://inputs/b.png", b"remote"), (view, b"xxbytes")):
        assert images.read(ref) == (data, hashlib.sha256(data).hexdigest())
    with pytest.raises(FileNotFoundError):
        images.read(str(tmp_path / "gone.png"))


# --- shards of images: a row with many images spans several shards --------------------------------

def bounds(got) -> list[tuple]:
    return [(s.index, (s.start, s.start_k), (s.stop, s.stop_k)) for s in got]


def test_image_shards_cut_rows_of_mixed_sizes_at_every_k_images():
    counts = [np.array([1, 3, 1]), np.array([2, 1])]  # 8 images; batch bounds do not matter
    assert bounds(image_shards(counts, 3)) == [
        (0, (0, 0), (1, 2)), (1, (1, 2), (3, 1)), (2, (3, 1), (5, 0))]
    assert bounds(image_shards([np.array([1, 3, 1, 2, 1])], 3)) == bounds(image_shards(counts, 3))


def test_a_row_larger_than_the_shard_size_spans_shards_and_exact_multiples_end_on_rows():
    assert bounds(image_shards([np.array([2, 10, 2])], 4)) == [
        (0, (0, 0), (1, 2)), (1, (1, 2), (1, 6)), (2, (1, 6), (2, 0)), (3, (2, 0), (3, 0))]
    assert bounds(image_shards([np.array([4, 4]), np.array([8])], 4)) == [
        (0, (0, 0), (1, 0)), (1, (1, 0), (2, 0)), (2, (2, 0), (2, 4)), (3, (2, 4), (3, 0))]
    assert bounds(image_shards([np.array([10_000])], 10_000)) == [(0, (0, 0), (1, 0))]
    assert [s.index for s in image_shards([np.array([2, 10, 2])], 4, skip={"shard-000001"})] == [0, 2, 3]


def test_read_shard_makes_only_the_images_of_its_k_range(tmp_path):
    path = str(tmp_path / "m.parquet")
    pq.write_table(table(id=["a", "b", "c"], num_images=[2, 10, 2], label=["x", "y", "z"]), path, row_group_size=2)
    with open_manifest(path) as m:
        got = [read_shard(m, s, Defaults()) for s in manifest_shards(m, 4)]
        whole = work_items(m.read(0, 3), 0, Defaults())
    assert [[i.id for i in r.items] for r in got] == [
        ["a-0", "a-1", "b-0", "b-1"], ["b-2", "b-3", "b-4", "b-5"], ["b-6", "b-7", "b-8", "b-9"], ["c-0", "c-1"]]
    assert [i for r in got for i in r.items] == whole  # same seeds and ids as the rows read whole
    assert [r.passthrough["label"].to_pylist() for r in got] == [["x", "y"], ["y"], ["y"], ["z"]]


def test_without_num_images_shards_are_todays_row_ranges(tmp_path):
    plain, ones = str(tmp_path / "plain.parquet"), str(tmp_path / "ones.parquet")
    pq.write_table(table(steps=list(range(1, 24))), plain, row_group_size=5)
    pq.write_table(table(num_images=pa.array([1] * 22 + [None], pa.int64())), ones, row_group_size=5)
    for path in (plain, ones):
        with open_manifest(path) as m:
            assert list(manifest_shards(m, 5)) == list(shards(23, 5))
            assert list(manifest_shards(m, 5, skip={"shard-000002"})) == list(shards(23, 5, skip={"shard-000002"}))


def test_pieces_are_the_rows_of_a_shard_with_its_images():
    shard = Shard(7, 1, 3, start_k=2, stop_k=1)
    assert [(p.start, p.start_k, p.stop, p.stop_k, p.piece, p.id) for p in shard.pieces()] == [
        (1, 2, 2, 0, True, "shard-000007"), (2, 0, 3, 0, True, "shard-000007"), (3, 0, 3, 1, True, "shard-000007")]
    assert shard.rows == 3 and Shard(0, 0, 5).pieces()[4] == Shard(0, 4, 5, piece=True)


def test_ten_million_rows_of_images_are_planned_lazily_with_flat_memory():
    def counts():
        for _ in range(10_000_000 // 16_384 + 1):
            yield np.full(16_384, 3, np.int64)

    first = list(itertools.islice(image_shards(counts(), 2), 3))
    assert bounds(first) == [(0, (0, 0), (0, 2)), (1, (0, 2), (1, 1)), (2, (1, 1), (2, 0))]
    tracemalloc.start()
    n = sum(1 for _ in image_shards(counts(), 1000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == -(-(10_000_000 // 16_384 + 1) * 16_384 * 3 // 1000) and peak < 2_000_000
