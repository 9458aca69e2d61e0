"""The baseline of the job-system benchmark: the plain loop a user would write instead of a job.

`python -m bench.loop MANIFEST MODEL OUT_FOLDER THREADS BATCH DEVICE DTYPE` (DTYPE a torch dtype's
name, e.g. float16) loads the pipeline in this process,
makes the rows' images with `Pipeline.generate`, BATCH rows per call (as `sdbatch run
--batch-size` does), saves each as `OUT_FOLDER/<id>.png` with PIL, and prints one JSON line:
seconds to load, seconds to make and save the images, each call's seconds, images. The manifest
must spell out every parameter, the same in every row (bench.jobsystem writes it so): no job
defaults, no seed derivation, nothing of sdbatch's job code. The process keeps freed memory as the job's CPU actors
do (`sdcore.allocator`), so that the comparison is of the job's own work, not of the allocator.
"""
import json
import sys
import time
from pathlib import Path


def main(manifest: str, model: str, out: str, threads: int, batch_size: int, device: str, dtype: str) -> dict:
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    import sdcore
    from sdcore.allocator import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(manifest).to_pylist()
    t0 = time.perf_counter()
    pipe = sdcore.load_pipeline(model, device=device, dtype=getattr(torch, dtype))
    t1 = time.perf_counter()
    calls = []
    for i in range(0, len(rows), batch_size):
        batch, first = rows[i:i + batch_size], rows[i]
        started = time.perf_counter()
        images = pipe.generate([r["prompt"] for r in batch], seeds=[r["seed"] for r in batch], steps=first["steps"],
                               height=first["height"], width=first["width"], guidance_scale=first["guidance_scale"],
                               scheduler=first["scheduler"], output="np")
        calls.append(time.perf_counter() - started)
        for row, image in zip(batch, images):
            Image.fromarray(image).save(folder / f"{row['id']}.png")
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "images_s": t2 - t1, "call_s": calls, "images": len(rows), "threads": threads,
            "batch_size": batch_size, "device": device, "dtype": dtype}


if __name__ == "__main__":
    manifest_path, model_source, out_folder, thread_count, batch_rows, device_name, dtype_name = sys.argv[1:]
    print(json.dumps(main(manifest_path, model_source, out_folder, int(thread_count), int(batch_rows), device_name,
                          dtype_name)), flush=True)
