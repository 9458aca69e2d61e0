"""`make bench`: sdcore against diffusers on the same random SD v1.5 weights; writes BENCHMARKS.md/.json.

run.py        the entry point (`python -m bench.run`), the CPU sections and the report
fixtures.py   one set of random SD v1.5 weights, written once as a diffusers folder and a single file
timing.py     interleaved repetitions, medians, machine facts
coldstart.py  one load in a fresh process (time, peak RSS), run as a child by run.py
levers.py     A/B of each speed lever of sdcore against the same modules without it
gpu.py        the GPU section (bf16/fp16, 512x512, 50 steps), when CUDA is present
gpu_check.py  the GPU check for a lent GPU machine (gpu_check.sh): the GPU section's figures, a job's
              efficiency on one GPU actor, a batch against its rows alone; --cpu-dry-run here
"""
