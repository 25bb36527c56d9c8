import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WORKBENCH_CACHE", str(Path(tempfile.gettempdir()) / "workbench-test-cache"))
os.environ.setdefault("WORKBENCH_DEVICE", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_base():
    from workbench.models import load_base

    return load_base("tiny", "float32", "cpu")


def tiny_study(**overrides):
    """A small study dict on the tiny base (the schema of presets/)."""
    data = {
        "name": "t",
        "base": "tiny",
        "subject": {"reference_images": [str(REPO / "assets/chelsea.png")], "token": "sks", "class_noun": "cat"},
        "prompts": ["a photo of a {subject} {class}"],
        "seeds": [0, 1],
        "steps": 2,
        "guidance": 5.0,
        "size": 32,
        "dtype": "float32",
        "methods": [{"kind": "baseline"}],
    }
    data.update(overrides)
    return data
