"""How many rows an actor puts in one pipeline call, per image size.

`--batch-size N` asks for N rows; `auto` (None here) takes BATCH_ON_CPU rows on the CPU, where a
batch saves passes over the weights but no launches, and on a GPU the largest bucket of BUCKETS
whose estimated memory fits the device's free memory. Either way an out-of-memory error halves the
rows for that size, for the rest of the actor's life. On a GPU, when auto or compiled, a short batch
is padded to the smallest bucket that holds it (see jobs.actor), so that a compiled or
graph-captured UNet meets a handful of shapes.
"""
import torch

BUCKETS = (1, 2, 4, 8, 16, 32)
BATCH_ON_CPU = 4
# Peak memory of one image row, per latent pixel and per byte of the dtype: SD v1.5's two UNet
# samples under guidance and its VAE decoder at full resolution, estimated on the high side (it
# grows linearly here, attention does not; an out-of-memory error halves the bucket anyway).
ROW_BYTES_PER_LATENT_PIXEL_BYTE = 150_000
MEMORY_SHARE = 0.8  # of the free memory: room for the allocator's rounding and fragmentation


def most_rows(batch_size: int | None, device_type: str) -> int:
    """The most rows a pipeline call may hold, for `--batch-size` (None: auto) on this type of device."""
    if batch_size is not None:
        return batch_size
    return BUCKETS[-1] if device_type == "cuda" else BATCH_ON_CPU


class BatchSizes:
    """Rows per pipeline call for each (height, width): a fixed N, or auto (`fixed` None)."""

    def __init__(self, fixed: int | None, device: torch.device, dtype: torch.dtype):
        self.fixed, self.device, self.dtype = fixed, device, dtype
        self._rows: dict[tuple[int, int], int] = {}

    @property
    def largest(self) -> int:
        return most_rows(self.fixed, self.device.type)

    def rows(self, height: int, width: int) -> int:
        if (height, width) not in self._rows:
            self._rows[height, width] = self._first(height, width)
        return self._rows[height, width]

    def padded(self, rows: int, most: int) -> int:
        """What a call of `rows` rows is padded to when its size takes `most`: the smallest bucket that
        holds them (never more than `most`), so a shard's last short batch costs few pad rows."""
        return min(min((b for b in BUCKETS if b >= rows), default=most), most)

    def halve(self, height: int, width: int, ran_out_at: int) -> None:
        """A call of `ran_out_at` rows (> 1) of this size ran out of memory."""
        self._rows[height, width] = min(self.rows(height, width), ran_out_at // 2)

    def unet_shapes(self) -> int:
        """Input shapes the UNet can meet for the sizes met so far: each size's rows and their halvings,
        at two samples a row (guidance) or one."""
        return 2 * self.largest.bit_length() * len(self._rows)

    def _first(self, height: int, width: int) -> int:
        if self.fixed is not None or self.device.type != "cuda":
            return self.largest
        return fitting_bucket(free_memory(self.device), height, width, self.dtype)


def fitting_bucket(free_bytes: int, height: int, width: int, dtype: torch.dtype) -> int:
    """The largest bucket whose rows of this size are estimated to fit in MEMORY_SHARE of `free_bytes` (at least 1)."""
    per_row = (height // 8) * (width // 8) * dtype.itemsize * ROW_BYTES_PER_LATENT_PIXEL_BYTE
    return max((b for b in BUCKETS if b * per_row <= MEMORY_SHARE * free_bytes), default=1)


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give this process: free on the device plus what torch's cache holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def allow_recompiles(shapes: int) -> None:
    """Let torch.compile build code for `shapes` input shapes of one function (and as many in all)
    before it gives up and runs eager, silently."""
    from torch._dynamo import config

    config.recompile_limit = max(config.recompile_limit, shapes)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, shapes)
