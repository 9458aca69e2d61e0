"""`--device` and `--dtype` as the user spells them, resolved where the model runs.

"auto" is resolved on the machine that loads the model (a Ray actor's GPU node), never on the
driver, which may have no GPU at all.
"""
import os
import platform

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
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


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]
