"""Weight files of the scorers (sdcore.scoring) -> sdcore modules.

- A transformers CLIP folder (`config.json`, `model.safetensors`, the tokenizer's `vocab.json` and
  `merges.txt`), such as `openai/clip-vit-large-patch14`: `CLIPModel`, or a
  `CLIPVisionModelWithProjection` when only image embeddings are needed.
- A diffusers `safety_checker/` folder (a CLIPConfig `config.json` and `model.safetensors`).
- The LAION aesthetic predictor's weight file: the published `.pth` state dict, or a `.safetensors`.
- A `preprocessor_config.json` (diffusers' `feature_extractor/`), checked against sdcore.scoring.preprocess.

Files are read as sdcore.weights reads a text encoder: memory-mapped, pickles with
`weights_only=True`, names and shapes checked against the config before any tensor is read.
"""
import os
from pathlib import Path

import torch
import torch.nn as nn

from sdcore import configs
from sdcore.clip_vision import CLIPImageEncoder, CLIPModel, CLIPVisionConfig
from sdcore.errors import UnsupportedModelError, WeightsError
from sdcore.scoring import CLIP_MEAN, CLIP_STD, AestheticPredictor, SafetyChecker
from sdcore.tokenizer import Tokenizer
from sdcore.weights import (POSITION_IDS, TensorFile, _pick_weight_file, _read_json, assign_weights, fit_problems,
                            weight_file_names, weights_fingerprint)

AESTHETIC_SUFFIXES = (".safetensors", ".pth")  # the predictor's weight file: safetensors first (no pickle)
SAFETY_CHECKER_FOLDER, FEATURE_EXTRACTOR_FILE = "safety_checker", "feature_extractor/preprocessor_config.json"
# The logit scale of CLIP's training loss, which inference does not use (nor the position-index
# buffers, POSITION_IDS, that older transformers saved).
UNUSED = ("logit_scale",)


def vision_config(d: dict, projection_dim: int | None = None) -> CLIPVisionConfig:
    """A transformers CLIPVisionConfig dict (alone, or a CLIPConfig's `vision_config`) ->
    CLIPVisionConfig; `projection_dim` is the CLIPConfig's, which its projections use."""
    if d.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise UnsupportedModelError(f"CLIP image tower with hidden_act {d['hidden_act']!r}; "
                                    "sdbatch implements OpenAI CLIP's (quick_gelu)")
    cfg = CLIPVisionConfig(**{k: v for k, v in d.items() if k in CLIPVisionConfig.__dataclass_fields__})
    if projection_dim is not None:
        cfg.projection_dim = projection_dim
    for key in ("image_size", "patch_size"):
        if not isinstance(getattr(cfg, key), int):
            raise UnsupportedModelError(f"CLIP image tower with a non-square {key} {getattr(cfg, key)!r}")
    return cfg


def preprocessor_config(d: dict) -> int:
    """A `preprocessor_config.json` (a `feature_extractor/` folder's, 2022-era or today's) -> the
    image side that sdcore.scoring.preprocess must produce; refused unless it asks for exactly
    that preprocessing (bicubic shortest-side resize to the crop's side, centre crop, 1/255, CLIP's
    mean and std)."""
    size, crop = d.get("size", 224), d.get("crop_size", 224)
    size = size.get("shortest_edge") if isinstance(size, dict) and len(size) == 1 else size
    if isinstance(crop, dict) and crop.keys() == {"height", "width"} and crop["height"] == crop["width"]:
        crop = crop["height"]
    expected = {"do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
                "resample": 3, "rescale_factor": 1 / 255, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    differ = [f"{k} {d[k]!r} (expected {v!r})" for k, v in expected.items()
              if k in d and (list(d[k]) if isinstance(d[k], (list, tuple)) else d[k]) != v]
    if size != crop or not isinstance(size, int):
        differ.append(f"size {d.get('size')!r} with crop_size {d.get('crop_size')!r} "
                      "(expected the shortest edge resized to the square crop's side)")
    if differ:
        raise UnsupportedModelError(f"image preprocessing other than CLIP's: {', '.join(differ)}")
    return size


def _clip_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder}/config.json: missing")
    d = _read_json(folder / "config.json")
    for part in ("text", "vision"):
        # 2022-era files also carry `<part>_config_dict`, whose values transformers lets win.
        if f"{part}_config_dict" in d:
            d[f"{part}_config"] = {**d.get(f"{part}_config", {}), **d[f"{part}_config_dict"]}
    return d


def load_clip(folder: str | os.PathLike, *, device="cpu", dtype=torch.float32) -> tuple[CLIPModel, Tokenizer]:
    """A transformers CLIPModel folder -> (CLIPModel, its tokenizer; CLIP's bundled one if it has none)."""
    root = Path(folder)
    d = _clip_config(root)
    if "text_config" not in d or "vision_config" not in d:
        raise WeightsError(f"{root}/config.json is not a CLIPModel's config (it has no text_config and vision_config)")
    text, vision = configs.clip_config(d["text_config"]), vision_config(d["vision_config"], d.get("projection_dim"))
    with torch.device("meta"):
        model = CLIPModel(text, vision)
    _adopt(model, _weight_file(root, dtype), device, dtype)
    vocab, merges = root / "vocab.json", root / "merges.txt"
    tokenizer = Tokenizer.from_files(vocab, merges) if vocab.is_file() and merges.is_file() else Tokenizer.default()
    return model, tokenizer


def load_image_encoder(folder: str | os.PathLike, *, device="cpu", dtype=torch.float32) -> CLIPImageEncoder:
    """The image tower and projection of a CLIPVisionModelWithProjection or CLIPModel folder."""
    root = Path(folder)
    d = _clip_config(root)
    cfg = vision_config(d["vision_config"], d.get("projection_dim")) if "vision_config" in d else vision_config(d)
    with torch.device("meta"):
        encoder = CLIPImageEncoder(cfg)
    return _adopt(encoder, _weight_file(root, dtype), device, dtype, skip=("text_model.", "text_projection."))


def load_safety_checker(folder: str | os.PathLike, *, device="cpu", dtype=torch.float32) -> SafetyChecker:
    """A diffusers `safety_checker/` folder -> SafetyChecker. Its image tower is saved under
    `vision_model.vision_model.*` (diffusers wraps a whole CLIPVisionModel)."""
    root = Path(folder)
    d = _clip_config(root)
    if "vision_config" not in d:
        raise WeightsError(f"{root}/config.json is not a safety checker's CLIPConfig (it has no vision_config)")
    file = _weight_file(root, dtype)
    concepts, special = (file.shapes.get(k, (0,))[0] for k in ("concept_embeds", "special_care_embeds"))
    cfg = vision_config(d["vision_config"], d.get("projection_dim"))
    with torch.device("meta"):
        checker = SafetyChecker(cfg, concepts, special)
    return _adopt(checker, file, device, dtype,
                  rename=lambda key: key.replace("vision_model.vision_model.", "vision_model.", 1))


def load_aesthetic_predictor(path: str | os.PathLike, *, device="cpu", dtype=torch.float32) -> AestheticPredictor:
    """The predictor's weight file. The published `.pth` is a pickled state dict: it is read with
    `torch.load(weights_only=True)`, whose unpickler builds only tensors and plain containers and
    refuses anything else, so no code from the file runs."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    file = TensorFile(path)
    with torch.device("meta"):
        predictor = AestheticPredictor(file.shapes.get("layers.0.weight", (0, 768))[1])
    return _adopt(predictor, file, device, dtype)


def clip_files(available, dtype: torch.dtype = torch.float32) -> list[str]:
    """The files of a transformers CLIP folder that `load_clip` reads, given every relative path the
    folder holds (e.g. a remote listing): what to fetch, and nothing more."""
    return _model_files(set(available), "", dtype) + [f for f in ("vocab.json", "merges.txt") if f in available]


def safety_checker_files(available, dtype: torch.dtype = torch.float32) -> list[str]:
    """The files `load_safety_checker_folder` reads from a folder holding a diffusers `safety_checker/`
    and its `feature_extractor/` (a SD 1.x model's folder, say)."""
    available = set(available)
    if "config.json" in available and f"{SAFETY_CHECKER_FOLDER}/config.json" not in available:
        raise WeightsError(f"a folder with a config.json of its own, not {SAFETY_CHECKER_FOLDER}/: for a safety "
                           f"checker's own folder, name the folder that holds it and its feature_extractor/")
    files = _model_files(available, f"{SAFETY_CHECKER_FOLDER}/", dtype)
    if FEATURE_EXTRACTOR_FILE not in available:
        raise WeightsError(f"no {FEATURE_EXTRACTOR_FILE} beside {SAFETY_CHECKER_FOLDER}/")
    return files + [FEATURE_EXTRACTOR_FILE]


def _model_files(available: set[str], prefix: str, dtype: torch.dtype) -> list[str]:
    names = weight_file_names("text_encoder", dtype)
    weight = next((prefix + n for n in names if prefix + n in available), None)
    missing = [f for f in (prefix + "config.json",) if f not in available] + ([] if weight else [prefix + names[0]])
    if missing:
        raise WeightsError(f"no {' and no '.join(missing)}")
    return [prefix + "config.json", weight]


def files_fingerprint(root: str | os.PathLike, files: list[str]) -> str:
    """Identifies a scorer's `files` (relative to `root`) as sdcore.weights identifies a model: its
    weight files' sizes, headers and sampled chunks, and its configs."""
    root = Path(root)
    configs_ = [f for f in files if f.endswith((".json", ".txt"))]
    return weights_fingerprint({f: TensorFile(root / f) for f in files if f not in configs_},
                       {f: (root / f).read_bytes() for f in configs_})


def load_safety_checker_folder(folder: str | os.PathLike, *, device="cpu",
                               dtype=torch.float32) -> tuple[SafetyChecker, int]:
    """A folder holding `safety_checker/` and `feature_extractor/` -> (SafetyChecker, the image side
    its preprocessing asks for); refused unless that side is the checker's own image size."""
    root = Path(folder)
    size = preprocessor_config(_read_json(root / FEATURE_EXTRACTOR_FILE))
    checker = load_safety_checker(root / SAFETY_CHECKER_FOLDER, device=device, dtype=dtype)
    if size != checker.vision_model.config.image_size:
        raise UnsupportedModelError(f"{root / FEATURE_EXTRACTOR_FILE}: crops to {size}, but the safety checker "
                                    f"takes {checker.vision_model.config.image_size}x{checker.vision_model.config.image_size} images")
    return checker, size


def _weight_file(folder: Path, dtype: torch.dtype) -> TensorFile:
    # transformers names a model's files as it names a text encoder's (model.safetensors, ...)
    return TensorFile(_pick_weight_file(folder, weight_file_names("text_encoder", dtype)))


def _adopt(module: nn.Module, file: TensorFile, device, dtype, rename=lambda key: key,
           skip: tuple[str, ...] = ()) -> nn.Module:
    """Check the file's names and shapes against `module` (built on the meta device), then give it
    the file's tensors, converted one at a time."""
    names = {rename(key): key for key in file.shapes
             if key not in UNUSED and not key.endswith(POSITION_IDS) and not key.startswith(skip)}
    problems = fit_problems(module, {k: file.shapes[key] for k, key in names.items()}, in_file=names.__getitem__)
    if problems:
        raise WeightsError(f"{file.path}: the weights do not fit {type(module).__name__}: {'; '.join(problems)}")
    return assign_weights({"": module}, lambda _, k: file[names[k]], device, dtype)[""]
