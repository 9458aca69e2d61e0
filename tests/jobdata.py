"""Helpers for the job tests: small manifests, and reading a finished dataset back."""
import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file

from jobs import sink
from jobs.manifest import Defaults, derive_seed
from sdcore import builtin
from tests.reference import SD15, write_clip_vocab_folder

MODEL = "builtin:tiny"
# Tiny and quick: 64×64 images, 2 denoising steps of builtin:tiny take ~0.05 s on one core.
DEFAULTS = Defaults(steps=2, width=64, height=64, scheduler="ddim")
TIMING = ("generation_seconds",)


def write_manifest(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def start_local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


def read_dataset(out: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(metadata rows by image id, failure rows by image id); asserts that no id appears twice."""
    def rows(folder: str) -> list[dict]:
        files = sorted((out / folder).glob("shard-*.parquet")) if (out / folder).is_dir() else []
        return [r for f in files for r in pq.read_table(f).to_pylist()]

    meta, failures = rows("metadata"), rows("failures")
    ids = [r["id"] for r in meta + failures]
    assert len(ids) == len(set(ids)), f"ids recorded more than once: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
    return {r["id"]: r for r in meta}, {r["id"]: r for r in failures}


def check_images(out: Path, meta: dict[str, dict]) -> dict[str, bytes]:
    """Every metadata row's image exists, decodes, has the row's hash and the row's parameters in its
    metadata (PNG text chunk, JPEG/WebP EXIF); returns the image bytes by id."""
    images = {}
    for image_id, row in meta.items():
        data = stored_image(out, row)
        assert hashlib.sha256(data).hexdigest() == row["image_sha256"]
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (row["width"], row["height"]) and im.mode == "RGB"
            im.load()
        params = sink.read_params(data)
        for key in ("id", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height",
                    "scheduler", "model", "model_fingerprint", "sdbatch_version"):
            assert params[key] == row[key], (image_id, key)
        assert params["scheduler_config"] == json.loads(row["scheduler_config"])
        images[image_id] = data
    return images


def stored_image(out: Path, row: dict) -> bytes:
    """A metadata row's image: its file, or for --format webdataset its member of the shard's tar."""
    if row.get("tar"):  # image_path is shards/<shard>.tar/<key>.<ext>
        return tar_members(out / row["tar"])[row["image_path"].rsplit("/", 1)[1]]
    return (out / row["image_path"]).read_bytes()


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def seed_of(row_id: str, k: int = 0, job_seed: int = 0) -> int:
    return (derive_seed(job_seed, row_id) + k) % 2**63


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its mtime and bytes."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# The SD v1.5 release's files that sdbatch must never fetch to generate (a safety checker, other
# weight variants, pickles beside safetensors, non-EMA weights, single-file checkpoints).
UNUSED_RELEASE_FILES = (
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "text_encoder/pytorch_model.bin", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/diffusion_pytorch_model.bin",
    "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt", "v1-inference.yaml",
)


def write_tiny_folder(root: Path, *, release_layout: bool = False, text_encoder_padding: int = 0) -> Path:
    """builtin:tiny's weights as a diffusers folder: the same images, but another model to sdbatch
    (its fingerprint comes from the files).

    `release_layout` adds what the SD v1.5 release's folder holds besides: model_index.json,
    scheduler and tokenizer files, fp16 variants, and (as junk bytes that fail to load) the files in
    UNUSED_RELEASE_FILES. `text_encoder_padding` bytes of a tensor the loader skips (the position ids
    2022-era files carry) make the text encoder's file large enough to be caught mid-download.
    """
    tensors = builtin.random_weights(builtin.configs())
    for component, config in (("unet", builtin.TINY_UNET), ("vae", builtin.TINY_VAE), ("text_encoder", builtin.TINY_CLIP)):
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text(json.dumps(config))
        prefix = "text_model." if component == "text_encoder" else ""
        stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
        state = {prefix + k: v.contiguous() for k, v in tensors[component].items()}
        if component == "text_encoder" and text_encoder_padding:
            state["text_model.embeddings.position_ids"] = torch.zeros(1, text_encoder_padding // 8, dtype=torch.int64)
        save_file(state, str(root / component / f"{stem}.safetensors"))
        if release_layout:
            save_file({k: v.half() for k, v in state.items() if v.is_floating_point()}, str(root / component / f"{stem}.fp16.safetensors"))
    if release_layout:
        for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes((SD15 / name).read_bytes())
        write_clip_vocab_folder(root / "tokenizer")
        (root / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|startoftext|>"}))
        for name in UNUSED_RELEASE_FILES:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"not for generation")
    return root
