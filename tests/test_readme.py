"""The Python examples of README.md run as written, in a folder holding what the README says the user has: for the
"Using a trained model" example, a trained model's weights file (`best.safetensors`, as `amfor-export --format
weights` writes it) and image crops (`crops/`)."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def user_files(block: str, root: Path) -> None:
    """The weights file and the crops a block names, made as a user's would be (a small model, random pixels)."""
    if "best.safetensors" in block:
        from extract_support import KWARGS, NAME, small_amfor

        from amfor.deploy.weights import save_weights

        save_weights(small_amfor(), root / "best.safetensors", NAME, KWARGS)
    rng = np.random.default_rng(0)
    for name in sorted(set(re.findall(r"crops/[\w.]+\.jpg", block))):
        (root / "crops").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(root / name)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the data example writes the synthetic dataset under ./data
    user_files(BLOCKS[index], tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
