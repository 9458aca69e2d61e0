"""How many rows `Pipeline.generate` sends through the UNet and the VAE decoder in one call.

On the CPU an image's bytes must not depend on the rows beside it. The kernels there compute each
float32 sample alike in any batch of two samples or more, on one or two torch threads (CPU actors run
one; half precision, with other kernels, is not held to it and keeps its rows apart). A single
sample takes other kernels (a one-row matmul, a minibatch-1 convolution), and over more threads ATen
cuts an elementwise op into chunks whose ends, where they fall off a vector's width, run scalar code
that rounds exp otherwise (SiLU), at places that move with the batch. With guidance every row is two
samples, unconditional and conditional, so there the whole batch goes through at once (fewer passes
over the weights), and an unguided row beside guided ones goes apart from them, as it would alone,
not as the conditional half of CFG. Otherwise the rows go one at a time, as through a compiled
UNet, which compiles every new batch shape and whose kernels make no such promise. The VAE decoder
takes one row at a time on the CPU, where a batch brings it no speed. A GPU takes the whole batch,
its unguided rows through CFG with the rest (one UNet shape per batch size); its kernels change
with the batch's shape, so its images are not held to equal bytes across batch sizes.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batching:
    """Rows per call; None means the whole batch."""

    guided_unet_rows: int | None = None
    unguided_unet_rows: int | None = None
    vae_rows: int | None = None
    unguided_apart: bool = False  # unguided rows of a batch with guided ones skip CFG's batch

    @classmethod
    def for_device(cls, device: torch.device | str, dtype: torch.dtype, compiled: bool = False,
                   threads: int | None = None) -> "Batching":
        """The policy for a pipeline on `device` in `dtype`, its UNet compiled or not, run on `threads`
        torch threads (None: this thread's count now)."""
        if torch.device(device).type != "cpu":
            return cls()
        threads = torch.get_num_threads() if threads is None else threads
        together = dtype == torch.float32 and not compiled and threads <= 2
        return cls(guided_unet_rows=None if together else 1, unguided_unet_rows=1, vae_rows=1, unguided_apart=True)

    def unet_rows(self, guided: bool) -> int | None:
        return self.guided_unet_rows if guided else self.unguided_unet_rows
