"""Weight files → sdcore modules, for both published layouts of Stable Diffusion 1.x.

- A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
  `scheduler/`). Our modules use diffusers' parameter names, so only two spellings of 2022-era
  files need renaming.
- A single `.safetensors` / `.ckpt` file with the original (CompVis LDM) names. It carries no
  config: SD v1.5's is assumed. `single_file_names` is the one place that knows those names.

Modules are built on the `meta` device and adopt the file's tensors as their parameters
(`load_state_dict(assign=True)`). safetensors files are memory-mapped, so float32 weights loaded
as float32 on the CPU are never copied, and any other dtype or device is converted one tensor at
a time: the model is never held twice. For a GPU, safetensors are read straight onto it, and every
tensor is converted to the dtype there, not on a CPU thread. Family, names and shapes of all three components are
checked before any tensor is read, so a wrong file fails whole, never half-loaded.
"""
import dataclasses
import hashlib
import json
import operator
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from sdcore import configs as config_readers
from sdcore.clip import CLIPTextConfig, CLIPTextEncoder
from sdcore.errors import UnsupportedModelError, WeightsError
from sdcore.pipeline import Pipeline
from sdcore.tokenizer import Tokenizer
from sdcore.unet import CROSS_ATTN_UP, UNet, UNetConfig
from sdcore.vae import AutoencoderKL, VAEConfig

# scheduler/scheduler_config.json of the SD v1.5 release (metadata keys left out), for sources
# that carry none: single files and builtin:tiny.
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

COMPONENTS = ("unet", "vae", "text_encoder")
MODULES = {"unet": (UNet, UNetConfig), "vae": (AutoencoderKL, VAEConfig), "text_encoder": (CLIPTextEncoder, CLIPTextConfig)}

# The small files of a diffusers folder that loading reads (each optional but the configs, which
# `folder_files` requires): configs, scheduler, vocabulary. The tokenizer's other two files are
# not read, but a folder is not a diffusers folder without them.
FOLDER_SMALL_FILES = ("model_index.json", *(f"{c}/config.json" for c in COMPONENTS), "scheduler/scheduler_config.json",
                      "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                      "tokenizer/special_tokens_map.json")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# Where each module lives in a single file (the text encoder's older files lack `text_model.`).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
CLIP_OLD_PREFIX = "cond_stage_model.transformer."
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
SINGLE_FILE_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX}
# A buffer of transformers' CLIP (int64 0..76) that 2022-era files saved; we compute positions instead.
POSITION_IDS = "embeddings.position_ids"


def load(source: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Pipeline:
    """A diffusers folder or a single `.safetensors` / `.ckpt` file → Pipeline."""
    path = Path(source)
    if not path.exists():
        raise WeightsError(f"{source}: no such file or directory")
    if path.is_dir():
        return load_folder(path, device=device, dtype=dtype, source=str(source))
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise WeightsError(f"{source}: expected a diffusers folder or a {' / '.join(SINGLE_FILE_SUFFIXES)} file")
    return load_single_file(path, device=device, dtype=dtype, source=str(source))


# --- diffusers folder ---------------------------------------------------------------------------

def load_folder(root: Path, *, device="cpu", dtype=torch.float32, source: str | None = None) -> Pipeline:
    index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    family = _folder_family({p.name for p in root.iterdir() if p.is_dir()}, index)
    if family:
        raise UnsupportedModelError(f"{root} looks like {family}; sdbatch supports Stable Diffusion 1.x only")
    missing = [f"{c}/" for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        hint = f" (model_index.json names a {index['_class_name']})" if "_class_name" in index else ""
        if (root / "config.json").is_file():
            hint += "; it looks like a single component's folder: point at the pipeline folder above it"
        raise WeightsError(f"{root} is not a complete diffusers folder: it has no {', '.join(missing)}{hint}")

    configs = {}
    for c in COMPONENTS:
        config_file = root / c / "config.json"
        if not config_file.is_file():
            raise WeightsError(f"{config_file}: missing")
        configs[c] = config_readers.READERS[c](_read_json(config_file))

    files, sources = {}, {}
    for c in COMPONENTS:
        file = _pick_weight_file(root / c, weight_file_names(c, dtype))
        files[f"{c}/{file.name}"] = tensors = TensorFile(file, device)
        sources[c] = {}
        for key in tensors.shapes:
            ours = _folder_name(c, key)
            if ours is not None:
                sources[c][ours] = (tensors, key)
    modules = _load_modules(configs, sources, device, dtype, shown=lambda c, ours: f"{c}/{_folder_key(c, ours)}",
                            where=str(root), against="the folder's config.json files")

    tok_dir = root / "tokenizer"
    vocab, merges = tok_dir / "vocab.json", tok_dir / "merges.txt"
    has_vocab = vocab.is_file() and merges.is_file()
    tokenizer = Tokenizer.from_files(vocab, merges) if has_vocab else Tokenizer.default()
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler_config = (
        {k: v for k, v in _read_json(scheduler_file).items() if not k.startswith("_")}
        if scheduler_file.is_file() else dict(SD15_SCHEDULER_CONFIG)
    )
    # Configs, vocabulary and scheduler shape the output as much as the weights do.
    small_files = [root / c / "config.json" for c in COMPONENTS] + [scheduler_file] + ([vocab, merges] if has_vocab else [])
    fingerprint = weights_fingerprint(files, {str(p.relative_to(root)): p.read_bytes() for p in small_files if p.is_file()})
    return Pipeline(tokenizer=tokenizer, **modules, scheduler_config=scheduler_config,
                    source=source or str(root), fingerprint=fingerprint, device=torch.device(device), dtype=dtype)


def weight_file_names(component: str, dtype: torch.dtype) -> tuple[str, ...]:
    """The weight files a diffusers component folder may hold, most preferred first: safetensors
    before pickles (memory-mapped, no pickle code), and within each the variant closest to the dtype
    that will run: the fp16 files for half precision (half the bytes), the full ones otherwise."""
    stem, pickle_stem = ("model", "pytorch_model") if component == "text_encoder" else ("diffusion_pytorch_model",) * 2
    variants = (".fp16", "") if dtype in (torch.float16, torch.bfloat16) else ("", ".fp16")
    return (*(f"{stem}{v}.safetensors" for v in variants), *(f"{pickle_stem}{v}.bin" for v in variants))


def folder_files(available: Iterable[str], dtype: torch.dtype = torch.float32) -> list[str]:
    """The files of a diffusers folder that `load_folder` reads at `dtype`, given every relative
    path the folder holds (e.g. a remote listing): what to fetch to generate, and nothing more — no
    other weight variants, no non-EMA UNet, no safety checker, no single-file checkpoints."""
    available = set(available)
    family = _folder_family({p.split("/", 1)[0] for p in available if "/" in p}, {})
    if family:
        raise UnsupportedModelError(f"it looks like {family}; sdbatch supports Stable Diffusion 1.x only")
    chosen = [f for f in FOLDER_SMALL_FILES if f in available]
    missing = [f"{c}/config.json" for c in COMPONENTS if f"{c}/config.json" not in available]
    for c in COMPONENTS:
        names = weight_file_names(c, dtype)
        found = next((f"{c}/{n}" for n in names if f"{c}/{n}" in available), None)
        if found is None:
            missing.append(f"{c}/{names[0]} (or {', '.join(names[1:])})")
        else:
            chosen.append(found)
    if missing:
        raise WeightsError(f"not a complete diffusers folder: no {'; no '.join(missing)}")
    return chosen


def _folder_family(subfolders: set[str], index: dict) -> str | None:
    """What a diffusers folder looks like if its layout alone shows it is not SD 1.x.

    SD 2.x folders have the SD 1.x layout; their configs give them away (see the config readers).
    """
    name = index.get("_class_name", "")
    if "text_encoder_2" in subfolders or "text_encoder_2" in index or "XL" in name:
        return f"SDXL{f' ({name})' if name else ''}: it has a second text encoder, text_encoder_2/"
    if "transformer" in subfolders or "transformer" in index:
        return f"a diffusion-transformer model{f' ({name})' if name else ''} (SD3, Flux, PixArt, ...): it has transformer/ instead of unet/"
    return None


def _pick_weight_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no weight file (looked for {', '.join(names)})")


_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _folder_name(component: str, key: str) -> str | None:
    """Our parameter name for a tensor of a diffusers component file; None to skip it."""
    if component == "text_encoder":
        key = key.removeprefix("text_model.")
        return None if key == POSITION_IDS else key
    if component == "vae":
        # 2022-era VAE files name the mid-block attention like diffusers' old AttentionBlock.
        parts = key.split(".")
        if len(parts) == 6 and parts[1:4] == ["mid_block", "attentions", "0"] and parts[4] in _LEGACY_VAE_ATTENTION:
            return ".".join([*parts[:4], _LEGACY_VAE_ATTENTION[parts[4]], parts[5]])
    return key


def _folder_key(component: str, ours: str) -> str:
    """The name a current diffusers / transformers file gives our parameter (for messages)."""
    return f"text_model.{ours}" if component == "text_encoder" else ours


# --- single file --------------------------------------------------------------------------------

def load_single_file(path: Path, *, device="cpu", dtype=torch.float32, source: str | None = None,
                     configs: dict | None = None) -> Pipeline:
    """A single LDM-layout file. `configs` ({"unet": UNetConfig, ...}) defaults to SD v1.5's."""
    given = configs is not None
    configs = {c: MODULES[c][1]() for c in COMPONENTS} | (configs or {})
    tensors = TensorFile(path, device)
    family = single_file_family(tensors.shapes)
    if family:
        raise UnsupportedModelError(f"{path} looks like {family}; sdbatch supports Stable Diffusion 1.x only")

    conv_in = tensors.shapes.get(UNET_CONV_IN)
    if conv_in is not None and len(conv_in) == 4:
        # An inpainting UNet differs only in its input channels (latents, mask, masked image's latents).
        configs["unet"] = dataclasses.replace(configs["unet"], in_channels=conv_in[1])
    table = single_file_names(**configs)
    original = {ours: name for name, ours in table.items()}
    sources = {c: {} for c in COMPONENTS}
    for key in tensors.shapes:
        name = key
        if key.startswith(CLIP_OLD_PREFIX) and not key.startswith(CLIP_PREFIX):
            name = CLIP_PREFIX + key.removeprefix(CLIP_OLD_PREFIX)
        if name in table:
            component, ours = table[name]
            sources[component][ours] = (tensors, key)
            continue
        # Unknown names under a module's prefix are reported as unexpected. Everything else (the
        # EMA copy under model_ema.*, the noise schedule's buffers, ...) is not needed for inference.
        component = next((c for c, prefix in SINGLE_FILE_PREFIXES.items() if name.startswith(prefix)), None)
        if component and name != CLIP_PREFIX + POSITION_IDS:
            sources[component][key] = (tensors, key)
    against = "the given configs" if given else "SD v1.5's architecture (a single file carries no config)"
    modules = _load_modules(configs, sources, device, dtype, shown=lambda c, ours: original[(c, ours)],
                            where=str(path), against=against)
    return Pipeline(tokenizer=Tokenizer.default(), **modules, scheduler_config=dict(SD15_SCHEDULER_CONFIG),
                    source=source or str(path), fingerprint=weights_fingerprint({"": tensors}, {}),
                    device=torch.device(device), dtype=dtype)


def single_file_family(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What a single file looks like, from its names and shapes alone, if it is not SD 1.x (else None)."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has("conditioner.embedders.") or has(UNET_PREFIX + "label_emb."):
        return "SDXL (conditioner.embedders.* text encoders / label_emb size conditioning)"
    if has(UNET_PREFIX + "joint_blocks."):
        return "Stable Diffusion 3 (an MMDiT under model.diffusion_model.joint_blocks.*)"
    if has("double_blocks.") or has(UNET_PREFIX + "double_blocks."):
        return "Flux (double_blocks.* / single_blocks.*)"
    if has("cond_stage_model.model."):
        return "Stable Diffusion 2.x (an OpenCLIP text encoder under cond_stage_model.model.*)"
    context = {s[-1] for k, s in shapes.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")}
    for width, family in ((1024, "Stable Diffusion 2.x"), (2048, "SDXL")):
        if width in context:
            return f"{family} (cross-attention to a {width}-wide text context; SD 1.x: 768)"
    if any(k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight") and len(s) == 2 for k, s in shapes.items()):
        return "Stable Diffusion 2.x (linear proj_in/proj_out in the transformer blocks; SD 1.x: 1x1 convs)"
    conv_in = shapes.get(UNET_CONV_IN)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] not in (4, 9):
        kind = {8: "an InstructPix2Pix model", 7: "the x4 upscaler"}.get(conv_in[1], "a UNet")
        return f"{kind} ({conv_in[1]} UNet input channels; SD 1.x: 4, or 9 for inpainting)"
    if not has(UNET_PREFIX):
        if any("lora" in k.lower() for k in shapes):
            return "a LoRA / adapter file, not a full model"
        if has("encoder.") and has("decoder.") and not has(VAE_PREFIX):
            return "a standalone VAE, not a full model"
    return None


_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def single_file_names(unet: UNetConfig, vae: VAEConfig, text_encoder: CLIPTextConfig) -> dict[str, tuple[str, str]]:
    """Original (LDM) name → (component, our name), for every parameter of the three modules."""
    table = {}
    for component, module in on_meta({"unet": unet, "vae": vae, "text_encoder": text_encoder}).items():
        for ours in module.state_dict():
            if component == "unet":
                name = UNET_PREFIX + _unet_original(ours, unet)
            elif component == "vae":
                name = VAE_PREFIX + _vae_original(ours, vae)
            else:
                name = CLIP_PREFIX + ours
            table[name] = (component, ours)
    return table


def _unet_original(ours: str, cfg: UNetConfig) -> str:
    """LDM numbers the UNet's blocks in one sequence per path: input_blocks.0 is conv_in, then each
    level has `layers_per_block` (resnet, transformer) slots and a downsampler slot; every up level
    has `layers_per_block + 1` slots, the last also holding the upsampler after its transformer."""
    module, param = ours.rsplit(".", 1)
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    per_level = cfg.layers_per_block + 1
    match module.split("."):
        case ["down_blocks", level, "downsamplers", "0", "conv"]:
            parts = [f"input_blocks.{(int(level) + 1) * per_level}.0.op"]
        case ["down_blocks", level, kind, i, *rest]:
            parts = [f"input_blocks.{1 + int(level) * per_level + int(i)}", _slot(kind), *_unet_layer(kind, rest)]
        case ["mid_block", kind, i, *rest]:  # resnet, transformer, resnet: no slots
            parts = [f"middle_block.{1 if kind == 'attentions' else 2 * int(i)}", *_unet_layer(kind, rest)]
        case ["up_blocks", level, "upsamplers", "0", "conv"]:
            slot = 2 if cfg.up_block_types[int(level)] == CROSS_ATTN_UP else 1
            parts = [f"output_blocks.{int(level) * per_level + per_level - 1}.{slot}.conv"]
        case ["up_blocks", level, kind, i, *rest]:
            parts = [f"output_blocks.{int(level) * per_level + int(i)}", _slot(kind), *_unet_layer(kind, rest)]
        case _:
            raise KeyError(f"no original name known for UNet parameter {ours}")
    return ".".join([*parts, param])


def _slot(kind: str) -> str:
    # Within a level's slot, the resnet is module 0 and the transformer after it module 1.
    return "0" if kind == "resnets" else "1"


def _unet_layer(kind: str, rest: list[str]) -> list[str]:
    # A resnet's layers have LDM names; inside the transformers diffusers kept the original names.
    return [_RESNET[rest[0]]] if kind == "resnets" else rest


def _vae_original(ours: str, cfg: VAEConfig) -> str:
    """LDM's VAE numbers the decoder's levels from the bottom (up.3 runs first) and calls resnets `block`."""
    module, param = ours.rsplit(".", 1)
    levels = len(cfg.block_out_channels)
    match module.split("."):
        case [coder, "conv_norm_out"]:
            parts = [coder, "norm_out"]
        case [coder, "down_blocks", i, "resnets", j, layer]:
            parts = [coder, "down", i, "block", j, _vae_resnet(layer)]
        case [coder, "down_blocks", i, "downsamplers", "0", "conv"]:
            parts = [coder, "down", i, "downsample", "conv"]
        case [coder, "up_blocks", i, "resnets", j, layer]:
            parts = [coder, "up", str(levels - 1 - int(i)), "block", j, _vae_resnet(layer)]
        case [coder, "up_blocks", i, "upsamplers", "0", "conv"]:
            parts = [coder, "up", str(levels - 1 - int(i)), "upsample", "conv"]
        case [coder, "mid_block", "resnets", i, layer]:
            parts = [coder, "mid", f"block_{int(i) + 1}", _vae_resnet(layer)]
        case [coder, "mid_block", "attentions", "0", layer, *_]:  # to_out.0 -> proj_out
            parts = [coder, "mid", "attn_1", _VAE_ATTENTION[layer]]
        case [_, "conv_in" | "conv_out"] | ["quant_conv" | "post_quant_conv"]:
            parts = [module]
        case _:
            raise KeyError(f"no original name known for VAE parameter {ours}")
    return ".".join([*parts, param])


def _vae_resnet(layer: str) -> str:
    return "nin_shortcut" if layer == "conv_shortcut" else layer


# --- shared: reading files, checking, assembling ----------------------------------------------

class TensorFile:
    """The named tensors of one weight file: shapes known up front, data read on demand.

    safetensors are memory-mapped, or read straight onto `device` where that is a GPU; `.bin` / `.ckpt`
    pickles are read with `weights_only=True` (no code runs) and memory-mapped too, possibly nested
    under `state_dict` as Lightning saved them.
    """

    def __init__(self, path: Path, device: str | torch.device = "cpu"):
        self.path = path
        self.size = path.stat().st_size
        if path.suffix == ".safetensors":
            self.header = _safetensors_header(path, self.size)
            entries = json.loads(self.header)
            self.shapes = {k: tuple(v["shape"]) for k, v in entries.items() if k != "__metadata__"}
            try:
                read_to = str(device) if torch.device(device).type == "cuda" else "cpu"
                self._get = safe_open(path, framework="pt", device=read_to).get_tensor
            except Exception as e:  # safetensors' own checks (dtype names, overlapping offsets, ...)
                raise WeightsError(f"{path}: not a valid safetensors file ({e})") from None
        else:
            self.header = b""
            tensors = _torch_load(path)
            self.shapes = {k: tuple(t.shape) for k, t in tensors.items()}
            self._get = tensors.__getitem__

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get(key)


def _safetensors_header(path: Path, size: int) -> bytes:
    """The JSON header, after checking that the file holds every byte the header describes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n) if 8 + n <= size else b""
    if size < 8 or 8 + n > size:
        raise WeightsError(f"{path}: truncated, or not a safetensors file ({size:,} bytes, too short for its header)")
    try:
        entries = json.loads(raw)
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise WeightsError(f"{path}: not a safetensors file (its header is not a safetensors header)") from None
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated: {size:,} bytes, but its header describes {8 + n + end:,} "
                           "(an interrupted download or copy?)")
    return raw


def read_torch_file(path: Path) -> object:
    """What a PyTorch pickle holds, read with weights_only=True: tensors, dicts, lists, numbers and strings
    only, so no code from the file runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{path}: holds Python objects other than tensors, which sdbatch does not unpickle (weights_only=True, "
            f"so no code from the file runs); convert it to .safetensors. ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint; truncated or corrupt? ({_first_line(e)})") from None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    obj = read_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def on_meta(configs: dict) -> dict[str, nn.Module]:
    """The modules for `{"unet": UNetConfig, ...}`, with shapes but no storage (no memory, no init time)."""
    with torch.device("meta"):
        return {c: MODULES[c][0](cfg) for c, cfg in configs.items()}


def assign_weights(modules: dict[str, nn.Module], read: Callable[[str, str], torch.Tensor], device, dtype
                   ) -> dict[str, nn.Module]:
    """Give each meta-device module its tensors, `read(component, our name)`, converted one at a time."""
    for c, module in modules.items():
        state = {}
        for k, meta in module.state_dict().items():
            t = read(c, k)
            if t.shape != meta.shape:
                t = t.view(meta.shape)  # a 1x1 conv kernel stored for a Linear weight (see _fits)
            # Moved in the file's dtype, then converted: a move that also converts converts on the CPU.
            state[k] = t.to(device).to(dtype)
        module.load_state_dict(state, strict=True, assign=True)
        module.eval().requires_grad_(False)
    return modules


def _load_modules(configs: dict, sources: dict[str, dict[str, tuple[TensorFile, str]]], device, dtype,
                  shown: Callable[[str, str], str], where: str, against: str) -> dict[str, nn.Module]:
    """Check every component's names and shapes, then (only if all fit) give each module its tensors.

    `sources[component][our name] = (file, key in file)`; `shown(component, our name)` is the name
    the file should have had, for messages.
    """
    modules = on_meta(configs)
    problems = []
    for c, module in modules.items():
        found = {k: f.shapes[key] for k, (f, key) in sources[c].items()}
        parts = fit_problems(module, found, in_file=lambda k: sources[c][k][1], ours=lambda k: shown(c, k), fits=_fits)
        if parts:
            problems.append(f"{c}: {'; '.join(parts)}")
    if problems:
        raise WeightsError(f"{where}: the weights do not fit {against}. " + ". ".join(problems))

    def read(c: str, k: str) -> torch.Tensor:
        f, key = sources[c][k]
        return f[key]

    return assign_weights(modules, read, device, dtype)


def fit_problems(module: nn.Module, found: dict[str, tuple[int, ...]], *, in_file: Callable[[str], str],
                 ours: Callable[[str], str] = lambda k: k,
                 fits: Callable[[tuple, tuple], bool] = operator.eq) -> list[str]:
    """Why a file's tensors `found` (by the module's parameter name -> shape) do not fit `module`: the
    counts of missing, unexpected and wrongly shaped ones, a few named each; empty when they fit.
    `in_file(k)` is a found tensor's name in the file, `ours(k)` how to name a missing one."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [ours(k) for k in expected if k not in found]
    unexpected = [in_file(k) for k in found if k not in expected]
    wrong = [f"{in_file(k)} is {list(found[k])}, expected {list(shape)}"
             for k, shape in expected.items() if k in found and not fits(found[k], shape)]
    return [f"{len(names)} {what} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
            if names]


def _fits(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    # The original VAE's attention uses 1x1 convs where ours has Linear layers: same numbers.
    return found == expected or (len(expected) == 2 and found == (*expected, 1, 1))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not readable as JSON ({_first_line(e)})") from None


def weights_fingerprint(files: dict[str, TensorFile], small_files: dict[str, bytes]) -> str:
    """sha256 of what identifies the weights without reading gigabytes: per weight file its size, its
    safetensors header (names, shapes, dtypes, offsets) and a few sampled chunks; plus configs."""
    h = hashlib.sha256()
    for label, f in sorted(files.items()):
        h.update(f"{label}\0{f.size}\0".encode())
        h.update(f.header)
        h.update(_sampled_chunks(f.path, f.size))
    for label, data in sorted(small_files.items()):
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)
    return "sha256:" + h.hexdigest()


def _sampled_chunks(path: Path, size: int, count: int = 16, chunk: int = 1 << 16) -> bytes:
    with open(path, "rb") as f:
        out = []
        for i in range(count):
            f.seek(max(size - chunk, 0) * i // (count - 1))
            out.append(f.read(chunk))
    return b"".join(out)


# --- checking a model source before loading it (jobs.sources: the driver's checks) ----------------

def missing_components(folder: str | os.PathLike) -> list[str]:
    """The component subfolders (`unet/`, `vae/`, `text_encoder/`) a diffusers model folder lacks."""
    root = Path(folder)
    return [f"{c}/" for c in COMPONENTS if not (root / c).is_dir()]


def is_folder_listing(available: Iterable[str]) -> bool:
    """Whether the relative paths a folder or repo holds are a diffusers model's (a component's
    config.json or model_index.json), rather than single-file checkpoints."""
    available = set(available)
    return "model_index.json" in available or any(f"{c}/config.json" in available for c in COMPONENTS)
