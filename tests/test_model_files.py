"""The model files are plain PyTorch: CPU kernels and process settings live in sdcore.cpu and sdcore.batching."""
import re
from pathlib import Path

import pytest

SDCORE = Path(__file__).resolve().parents[1] / "sdcore"
MODEL_FILES = ["tokenizer.py", "clip.py", "unet.py", "vae.py", "layers.py", "pipeline.py",
               *sorted(str(p.relative_to(SDCORE)) for p in (SDCORE / "schedulers").glob("*.py"))]
FORBIDDEN = re.compile(r"onednn|mkldnn|winograd|mallopt|num_threads", re.IGNORECASE)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_file_names_no_cpu_kernel_or_process_setting(name):
    text = (SDCORE / name).read_text(encoding="utf-8")
    found = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group()}" for m in FORBIDDEN.finditer(text)]
    assert not found, f"sdcore/{name}: {', '.join(found)}"
