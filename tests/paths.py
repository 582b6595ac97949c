"""Locations shared by the Cog tests: the repo root and the tiny real-format checkpoint."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DATA = REPO_ROOT / "tests" / "data"
# CI runs on a fresh clone with the shared folder beside it: <clone>/../shared/golden/...
SHARED_GOLDEN = REPO_ROOT.parent / "shared" / "golden"


def tiny_checkpoint() -> Path | None:
    """The tiny MLA checkpoint (random weights, 1024-token tokenizer), or None if absent."""
    for candidate in (
        TESTS_DATA / "golden" / "cases" / "mla" / "model",
        SHARED_GOLDEN / "cases" / "mla" / "model",
    ):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def golden_image(name: str = "img_640x480.png") -> Path | None:
    """One of the shared golden input images, or None if the shared folder is absent."""
    for candidate in (TESTS_DATA / "golden" / "inputs" / name, SHARED_GOLDEN / "inputs" / name):
        if candidate.is_file():
            return candidate
    return None
