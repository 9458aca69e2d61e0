"""LoRA adapters: kohya/A1111 and diffusers/PEFT files, merged into a loaded pipeline's weights.

A LoRA layer adds scale * (alpha / rank) * up @ down to a linear or convolution weight, as diffusers
and PEFT compute it (alpha is the rank when the file gives none); the layers of several LoRAs add up.
`Adapters` merges a set into the weights, so a step costs what it costs without adapters, and copies
back a host copy of every weight it changed, so the base weights return bit for bit.
"""
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from sdcore.errors import LoRAError

# Name prefixes in each format → the component they adapt.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder"}
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}


@dataclass
class LoRALayer:
    key: str  # the file's name of its down weight, for messages
    component: str  # "unet" or "text_encoder"
    module: str  # our module's name with "_" for ".", as kohya spells it (the text encoder's without "text_model_")
    down: torch.Tensor  # [rank, in] or [rank, in, kh, kw]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    def delta(self, scale: float, device: torch.device) -> torch.Tensor:
        """scale * (alpha / rank) * up @ down in float32 on `device`, shaped like the weight: [out, in] or
        [out, in, kh, kw]."""
        rank = self.down.shape[0]
        product = self.up.flatten(1).to(device, torch.float32) @ self.down.flatten(1).to(device, torch.float32)
        return (product * (scale * self.alpha / rank)).view(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoRA:
    name: str
    sha256: str  # of the file's bytes
    layers: list[LoRALayer]


def read_lora(path, name: str) -> LoRA:
    """A kohya/A1111 (`lora_unet_*` / `lora_te_*` with `.lora_down` / `.lora_up` / `.alpha`) or diffusers/PEFT
    (`unet.*` / `text_encoder.*` with `.lora_A` / `.lora_B`) `.safetensors` LoRA. Raises LoRAError otherwise."""
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
        tensors = load(data)
    except Exception as e:
        raise LoRAError(f"LoRA {name!r}: cannot read {path} as a safetensors file ({type(e).__name__}: {e})") from None
    for prefixes, suffixes in ((KOHYA_PREFIXES, KOHYA_SUFFIXES), (DIFFUSERS_PREFIXES, DIFFUSERS_SUFFIXES)):
        if tensors and all(k.startswith(tuple(prefixes)) for k in tensors):
            layers = _layers(tensors, prefixes, suffixes, f"LoRA {name!r} ({path})")
            return LoRA(name, hashlib.sha256(data).hexdigest(), layers)
    raise LoRAError(f"LoRA {name!r}: {path} is neither a kohya/A1111 LoRA (lora_unet_* / lora_te_* keys) nor a "
                    f"diffusers/PEFT one (unet.* / text_encoder.* keys with lora_A / lora_B); its first keys: "
                    f"{sorted(tensors)[:3]}")


def _layers(tensors: dict, prefixes: dict, suffixes: dict, where: str) -> list[LoRALayer]:
    """The file's tensors grouped into layers."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        base, suffix = next(((key.removesuffix("." + s), kind) for s, kind in suffixes.items() if key.endswith("." + s)),
                            (None, None))
        if base is None:
            raise LoRAError(f"{where}: unsupported key {key!r} (only plain LoRA layers: {', '.join(suffixes)})")
        parts.setdefault(base, {})[suffix] = tensor
    down_suffix = next(s for s, kind in suffixes.items() if kind == "down")
    layers = []
    for base, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoRAError(f"{where}: layer {base!r} lacks its {'down' if 'down' not in p else 'up'} weight")
        prefix = next(x for x in prefixes if base.startswith(x))
        module = base.removeprefix(prefix).replace(".", "_").removeprefix("text_model_")
        alpha = float(p["alpha"]) if "alpha" in p else float(p["down"].shape[0])
        layers.append(LoRALayer(f"{base}.{down_suffix}", prefixes[prefix], module, p["down"], p["up"], alpha))
    return layers


def _targets(pipe) -> dict[tuple[str, str], nn.Module]:
    """(component, module name with "_" for ".") → every linear and convolution layer a LoRA may adapt."""
    return {(component, name.replace(".", "_")): m
            for component in ("unet", "text_encoder")
            for name, m in getattr(pipe, component).named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def _fits(layer: LoRALayer, module: nn.Module) -> bool:
    weight = module.weight
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return False
    rank = layer.down.shape[0]
    return (layer.down.shape[1:] == weight.shape[1:]
            and layer.up.shape == (weight.shape[0], rank, *[1] * (weight.ndim - 2)))


def lora_problems(pipe, lora: LoRA) -> list[str]:
    """The file's keys (of down weights) whose layer the model lacks or whose shapes do not fit it; [] when the
    whole LoRA fits. Reads only the modules' names and weight shapes."""
    return _misfits(_targets(pipe), lora)


def _misfits(targets: dict[tuple[str, str], nn.Module], lora: LoRA) -> list[str]:
    return [layer.key for layer in lora.layers
            if (module := targets.get((layer.component, layer.module))) is None or not _fits(layer, module)]


class Adapters:
    """Merges sets of LoRAs into a pipeline's UNet and text encoder weights, one set at a time.

    One per pipeline: another would take the weights this one merged for the base weights."""

    def __init__(self, pipe):
        if pipe.compiled and pipe.device.type == "cpu":
            raise ValueError("make Adapters before Pipeline.compile(): on the CPU the compiled UNet freezes the "
                             "weights it was compiled with")
        # Compiled code then reads the weights at every call, so it sees each merged set.
        pipe.freeze_compiled_weights = False
        self.pipe = pipe
        self._targets = _targets(pipe)
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # a host copy of every weight ever changed
        self._changed: set[tuple[str, str]] = set()  # the weights that now differ from their base
        self._merged: tuple[tuple[str, str, float], ...] = ()  # (name, sha256, scale) of the LoRAs merged now

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(name, scale) of the LoRAs merged now."""
        return tuple((name, scale) for name, _, scale in self._merged)

    @torch.no_grad()
    def activate(self, loras: Sequence[tuple[LoRA, float]]) -> None:
        """Merge exactly `loras` (each with its scale) into the base weights; [] restores the base weights."""
        merged = tuple((lora.name, lora.sha256, float(scale)) for lora, scale in loras)
        if merged == self._merged:
            return
        for lora, _ in loras:
            if problems := _misfits(self._targets, lora):
                raise LoRAError(f"LoRA {lora.name!r} does not fit the model: {', '.join(problems[:5])}")
        deltas: dict[tuple[str, str], list[tuple[LoRALayer, float]]] = {}
        for lora, scale in loras:
            for layer in lora.layers:
                deltas.setdefault((layer.component, layer.module), []).append((layer, float(scale)))
        for target in self._changed - deltas.keys():
            self._targets[target].weight.copy_(self._base[target])
        for target, layers in deltas.items():
            weight = self._targets[target].weight
            if target not in self._base:  # copied once: a copy per switch would cost a device-to-host transfer
                self._base[target] = weight.detach().to("cpu", copy=True)
            base = self._base[target]
            new = base.to(weight.device, torch.float32, copy=True)
            for layer, scale in layers:
                new += layer.delta(scale, weight.device)
            weight.copy_(new)  # rounded once into the weight's dtype
        self._changed = set(deltas)
        self._merged = merged
