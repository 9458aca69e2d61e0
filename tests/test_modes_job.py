"""Generation modes in the job: a manifest mixing text to image, image to image, inpainting, two LoRA
sets and a learned token makes, on any actor layout and through a resume or a lost actor, the very
images sdcore makes for each row alone; a row whose image cannot be used fails alone; adapters that
do not fit stop the job before any shard."""
import hashlib
import json
import threading
import time

import numpy as np
import pytest
import ray
import torch
from PIL import Image

import sdcore
from jobs.adapters import Adapters
from jobs.driver import RunError
from sdcore.embeddings import add_embeddings, read_embedding
from sdcore.images import fit_image, fit_mask
from sdcore.lora import Adapters as MergedLoRAs
from sdcore.lora import read_lora
from tests.jobdata import DEFAULTS, MODEL, TIMING, check_images, pixels, read_dataset, seed_of, write_manifest
from tests.test_actor import local_ray, one_thread, run_driver  # noqa: F401 (fixtures)
from tests.test_embeddings import write_embedding
from tests.test_lora import ATTENTION, TEXT, layer_names, write_lora
from tests.test_modes import inpainting_folder  # noqa: F401 (a fixture)

STRENGTH = 0.5


@pytest.fixture(scope="module")
def pipe():
    return sdcore.load_pipeline(MODEL)


@pytest.fixture(scope="module")
def inputs(pipe, tmp_path_factory):
    """Init images, masks, two LoRAs and an embedding for builtin:tiny, in one folder beside the manifests."""
    root = tmp_path_factory.mktemp("mixed")
    gen = np.random.default_rng(5)
    for name in ("a", "b"):  # 80x48: fitted to the rows' 64x64
        Image.fromarray(gen.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(root / f"{name}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(root / "mask.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    unet, text = layer_names(pipe, "unet", ATTENTION), layer_names(pipe, "text_encoder", TEXT)
    write_lora(root / "style.safetensors", pipe, {"unet": unet, "text_encoder": text}, kohya=True, rank=4, seed=1,
               alpha=2.0)
    write_lora(root / "detail.safetensors", pipe, {"unet": unet[::2]}, kohya=False, rank=2, seed=2)
    write_embedding(root / "toy.pt", "a1111.pt", torch.randn(2, pipe.text_encoder.config.hidden_size,
                                                              generator=torch.Generator().manual_seed(3)))
    return root


ROWS = [  # (prompt, init_image, mask_image, strength, loras)
    ("a plain fox", None, None, None, None),
    ("a fox, redrawn", "a.png", None, STRENGTH, None),
    ("a fox, redrawn again", "b.png", None, None, None),
    ("a fox in a window", "a.png", "mask.png", None, None),
    ("a fox in a frame", "b.png", "mask.png", STRENGTH, "style:0.8"),
    ("a stylised fox", None, None, None, "style:0.8"),
    ("a detailed stylised fox", None, None, None, "detail:1.2,style:0.5"),
    ("a <toy> on a shelf", None, None, None, None),
    ("another plain fox", None, None, None, None),
]


def adapters(root) -> Adapters:
    return Adapters.of([f"style={root / 'style.safetensors'}", f"detail={root / 'detail.safetensors'}"],
                       [f"<toy>={root / 'toy.pt'}"])


@pytest.fixture(scope="module")
def manifest(inputs):
    columns = list(zip(*ROWS))
    return write_manifest(inputs / "mixed.parquet", id=[f"r{i}" for i in range(len(ROWS))], prompt=list(columns[0]),
                          init_image=list(columns[1]), mask_image=list(columns[2]), strength=list(columns[3]),
                          loras=list(columns[4]))


def alone(pipe, root, row: int) -> np.ndarray:
    """Row `row` of ROWS made by sdcore on its own, with its adapters."""
    prompt, init, mask, strength, loras = ROWS[row]
    merged = MergedLoRAs(pipe)
    sets = [] if loras is None else [(read_lora(root / f"{n}.safetensors", n), float(s))
                                      for n, s in (part.split(":") for part in loras.split(","))]
    merged.activate(sets)
    args = {}
    if init is not None:
        args.update(init_images=[fit_image(Image.open(root / init), 64, 64)], strength=strength or DEFAULTS.strength)
    if mask is not None:
        args.update(mask_images=[fit_mask(Image.open(root / mask), 64, 64)])
    try:
        return pipe.generate([prompt], seeds=[seed_of(f"r{row}")], steps=DEFAULTS.steps, height=64, width=64,
                             scheduler=DEFAULTS.scheduler, guidance_scale=DEFAULTS.guidance_scale, output="np", **args)[0]
    finally:
        merged.activate([])


@pytest.fixture(scope="module")
def made(inputs, manifest, local_ray, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("made") / "out"
    result, _ = run_driver(manifest, out, actors=1, batch_size=1, shard_size=4, adapters=adapters(inputs))
    return out, result


def test_each_row_is_the_image_its_mode_makes_alone(made, inputs):
    out, result = made
    assert (result.images, result.failures) == (len(ROWS), 0)
    meta, _ = read_dataset(out)
    images = check_images(out, meta)
    pipe = sdcore.load_pipeline(MODEL)  # its own: the embedding is added to it
    add_embeddings(pipe, [read_embedding(inputs / "toy.pt", "<toy>")])
    for row in range(len(ROWS)):
        assert (pixels(images[f"r{row}"]) == alone(pipe, inputs, row)).all(), ROWS[row]
    modes = [meta[f"r{i}"]["mode"] for i in range(len(ROWS))]
    assert modes == ["txt2img", "img2img", "img2img", "inpaint", "inpaint", "txt2img", "txt2img", "txt2img", "txt2img"]
    assert [meta[f"r{i}"]["strength"] for i in range(5)] == [None, STRENGTH, DEFAULTS.strength, DEFAULTS.strength,
                                                              STRENGTH]
    job = json.loads((out / "_sdbatch" / "job.json").read_text())["identity"]
    sha = job["loras"]
    assert meta["r6"]["loras"] == [{"name": "detail", "scale": 1.2, "sha256": sha["detail"]},
                                   {"name": "style", "scale": 0.5, "sha256": sha["style"]}]
    assert meta["r7"]["embeddings"] == [{"token": "<toy>", "sha256": job["embeddings"]["<toy>"]}]
    assert meta["r0"]["embeddings"] == [] and meta["r0"]["loras"] == []
    assert meta["r3"]["init_image_sha256"] == hashlib.sha256((inputs / "a.png").read_bytes()).hexdigest()
    assert meta["r3"]["mask_image_sha256"] == hashlib.sha256((inputs / "mask.png").read_bytes()).hexdigest()


def test_any_layout_a_resume_and_a_lost_actor_give_the_same_bytes(made, inputs, manifest, tmp_path, local_ray):  # noqa: F811
    first, _ = made
    meta_first, _ = read_dataset(first)
    expected = check_images(first, meta_first)
    out = tmp_path / "out"
    killed = {}

    def on_dispatch(actor, shard):
        if killed:
            return
        killed["shard"] = shard.id

        def kill_when_it_has_started():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and ray.get(actor.progress.remote()) < (shard.id, 1):
                time.sleep(0.005)
            ray.kill(actor)

        threading.Thread(target=kill_when_it_has_started, daemon=True).start()

    result, _ = run_driver(manifest, out, actors=2, batch_size=4, shard_size=5, adapters=adapters(inputs),
                           on_dispatch=on_dispatch)
    assert result.actor_restarts == 1 and (result.images, result.failures) == (len(ROWS), 0)
    (out / "metadata" / "shard-000001.parquet").unlink()
    resumed, _ = run_driver(manifest, out, actors=1, batch_size=2, shard_size=5, adapters=adapters(inputs))
    assert resumed.shards_run == 1
    meta, failures = read_dataset(out)
    assert not failures and check_images(out, meta) == expected
    for image_id, row in meta.items():
        differs = {k for k in row if row[k] != meta_first[image_id][k]}
        assert differs <= {*TIMING, "image_path"}, (image_id, differs)


def test_a_row_whose_image_cannot_be_used_fails_alone(inputs, tmp_path, local_ray):  # noqa: F811
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["one", "two", "three"],
                              init_image=[str(inputs / "a.png"), str(inputs / "broken.png"), str(inputs / "b.png")])
    result, _ = run_driver(manifest, tmp_path / "out", actors=1, batch_size=4)
    assert (result.images, result.failures) == (2, 1)
    meta, failures = read_dataset(tmp_path / "out")
    assert sorted(meta) == ["0", "2"] and list(failures) == ["1"]
    assert "init_image" in failures["1"]["error"] and "broken.png" in failures["1"]["error"]


def test_adapters_that_do_not_fit_stop_the_job_before_any_shard(inputs, pipe, tmp_path, local_ray):  # noqa: F811
    other = sdcore.load_pipeline(MODEL)
    weight = other.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    weight.weight = torch.nn.Parameter(torch.zeros(weight.out_features + 1, weight.in_features))
    weight.out_features += 1
    misfit = write_lora(tmp_path / "misfit.safetensors", other, {"unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]},
                        kohya=True, rank=2, seed=4)
    manifest = write_manifest(tmp_path / "m.parquet", prompt=["one"], loras=["misfit"])
    with pytest.raises(RunError, match="misfit.*do not fit.*attn1_to_q") as e:
        run_driver(manifest, tmp_path / "out", actors=1, adapters=Adapters.of([f"misfit={misfit}"], None))
    assert e.value.exit_code == 2 and not (tmp_path / "out" / "metadata").exists()


def test_an_inpainting_model_makes_inpaint_rows_and_refuses_any_other(inputs, inpainting_folder, tmp_path,  # noqa: F811
                                                                        local_ray):  # noqa: F811
    model = str(inpainting_folder)
    rows = {"prompt": ["a fox in a window", "a fox in a frame"], "init_image": [str(inputs / "a.png"), str(inputs / "b.png")],
            "mask_image": [str(inputs / "mask.png")] * 2}
    manifest = write_manifest(tmp_path / "m.parquet", **rows, strength=[1.0, 0.6])
    result, _ = run_driver(manifest, tmp_path / "out", actors=1, batch_size=2, model=model)
    assert (result.images, result.failures) == (2, 0)
    meta, _ = read_dataset(tmp_path / "out")
    images = check_images(tmp_path / "out", meta)
    pipe = sdcore.load_pipeline(model)
    assert pipe.inpainting_unet
    for i, strength in enumerate((1.0, 0.6)):
        expected = pipe.generate([rows["prompt"][i]], seeds=[seed_of(str(i))], steps=DEFAULTS.steps, height=64, width=64,
                                 scheduler=DEFAULTS.scheduler, output="np", strength=strength,
                                 init_images=[fit_image(Image.open(rows["init_image"][i]), 64, 64)],
                                 mask_images=[fit_mask(Image.open(rows["mask_image"][i]), 64, 64)])[0]
        assert (pixels(images[str(i)]) == expected).all()

    mixed = write_manifest(tmp_path / "mixed.parquet", prompt=[*rows["prompt"], "no images"],
                           init_image=[*rows["init_image"], None], mask_image=[*rows["mask_image"], None])
    with pytest.raises(RunError, match="is an inpainting model, which needs an init_image and a mask_image on every row; "
                                       "the manifest also has 1 txt2img image") as e:
        run_driver(mixed, tmp_path / "refused", actors=1, model=model)
    assert e.value.exit_code == 2 and not (tmp_path / "refused" / "metadata").exists()
