"""`--device` and `--dtype` as the user spells them, resolved where the model runs.

"auto" is resolved on the machine that loads the model (a Ray actor's GPU node), never on the
driver, which may have no GPU at all. `--dtype auto` follows the device: fp16 on CUDA, where half
precision runs on the tensor cores in half the memory, and fp32 on the CPU, where half precision is
slower, not faster.
"""
import os
import platform

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICES = ("auto", "cuda", "cpu")


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is usable on {platform.node()}: {why_no_cuda()}")
    return torch.device(name)


def why_no_cuda() -> str:
    """What keeps torch from CUDA in this process, in a line."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA; install a CUDA build"
    try:
        torch.cuda.init()
    except Exception as e:  # e.g. a driver older than the CUDA that torch was built with
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")


def dtype_name(name: str, device: torch.device | str) -> str:
    """`--dtype` with "auto" replaced by the name it stands for on `device`."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    if name == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return name


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    return DTYPES[dtype_name(name, device)]


def prepare_backend(device: torch.device, dtype: torch.dtype) -> None:
    """Process-wide torch settings for a model that runs in `dtype` on `device`: fp32 on CUDA runs its
    matmuls and convolutions on the TF32 tensor cores (a 10-bit mantissa, as fp16 has, at fp32's range)."""
    if device.type == "cuda" and dtype == torch.float32:
        # These flags, not fp32_precision: after a set through fp32_precision, code that reads them raises.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
