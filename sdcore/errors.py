"""Errors sdcore raises on purpose, so callers can tell bad input from bugs."""


class SdcoreError(Exception):
    pass


class UnsupportedModelError(SdcoreError):
    """The weights or config belong to a model family other than Stable Diffusion 1.x."""


class WeightsError(SdcoreError):
    """A weight file or folder is missing, truncated, or does not match the architecture."""


class EmbeddingError(SdcoreError, ValueError):
    """A textual-inversion embedding file is unreadable, of no known layout, or does not fit the model."""


class CompileUnavailableError(SdcoreError):
    """torch.compile cannot build code on this machine (no C++ compiler for the CPU, no Triton for a GPU)."""


class NonFiniteOutputError(SdcoreError):
    """Some rows of a batch produced NaN/inf; `.images` keeps the good rows (None at `.rows`)."""

    def __init__(self, rows: list[int], images: list):
        super().__init__(f"non-finite values (NaN/inf) in the output of batch rows {rows}")
        self.rows = rows
        self.images = images


class LoRAError(SdcoreError, ValueError):
    """A LoRA file that cannot be read, or is neither a kohya/A1111 nor a diffusers/PEFT LoRA."""


class ImageError(SdcoreError, ValueError):
    """An init or mask image cannot be read or decoded."""
