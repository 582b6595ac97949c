"""Where the weights come from: an explicit directory, ./weights, or one logged Hugging Face download.

Precedence (first match wins):

1. ``$DEEPSEEK_VL2_WEIGHTS``: a local snapshot directory (tests point it at a tiny checkpoint).
2. ``./weights`` when it holds files and is not an unfinished download of ours.
3. ``huggingface_hub.snapshot_download`` of ``$DEEPSEEK_VL2_REPO`` (default
   ``deepseek-ai/deepseek-vl2-small``) at ``$DEEPSEEK_VL2_REVISION`` (default ``main``) into
   ``./weights``, with progress bars. An interrupted download is resumed on the next start.

``ADVICE`` says how to fix a missing or broken snapshot (predict.py's setup adds it to a
failed load; ``Pipeline.load`` verifies the snapshot once). Only the files the runtime reads are fetched
(``*.json``, ``*.safetensors``). Nothing runs at import time; the download happens only when
no local snapshot is found. ``python -m deepseek_vl2_runtime.hub`` (``make weights``) downloads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger("deepseek_vl2_runtime")

DEFAULT_REPO = "deepseek-ai/deepseek-vl2-small"
DEFAULT_REVISION = "main"
DEFAULT_LOCAL_DIR = Path("weights")
ALLOW_PATTERNS = ["*.json", "*.safetensors"]
COMPLETE_MARKER = ".download-complete"  # written into local_dir after a successful download
ADVICE = (
    "To fix: put a Hugging Face snapshot of the model (config.json, tokenizer.json, "
    "*.safetensors) in ./weights (`make weights` on a machine with network), or set "
    "DEEPSEEK_VL2_WEIGHTS to a directory holding one"
)


class WeightsUnavailableError(CheckpointError):
    """No local snapshot and the download failed. The message says what to do."""

    # coglet shows a failed setup as "Setup failed: setup failed: {__qualname__}: {message}"
    # in /health-check; a label reads better there than a class name.
    __qualname__ = "Weights unavailable"


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def download_failure_reason(exc: BaseException) -> str:
    """One line saying why `snapshot_download` failed, without the chained tracebacks."""
    from huggingface_hub import constants, errors

    chain = _chain(exc)
    kinds = tuple(type(e) for e in chain)

    def has(*types: type) -> bool:
        return any(issubclass(k, types) for k in kinds)

    if has(errors.OfflineModeIsEnabled) or constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE) and there is no local snapshot"
    if has(errors.GatedRepoError, errors.RepositoryNotFoundError):
        return "the Hub refused access (a gated or private repository, or a wrong name)"
    if has(errors.RevisionNotFoundError):
        return "the Hub has no such revision"
    root = chain[-1]
    detail = (str(root).strip().splitlines() or [""])[0][:200]
    names = " ".join(k.__name__ for k in kinds)
    if has(ConnectionError, TimeoutError) or "Connect" in names or "Timeout" in names:
        return f"the Hugging Face Hub at {constants.ENDPOINT} could not be reached ({detail})"
    return detail or type(root).__name__


def _is_unfinished_download(local_dir: Path) -> bool:
    # snapshot_download(local_dir=...) keeps its bookkeeping in .cache/huggingface; without our
    # marker next to it the last download was interrupted and must be resumed, not loaded.
    return (local_dir / ".cache" / "huggingface").is_dir() and not (
        local_dir / COMPLETE_MARKER
    ).exists()


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(p.name != ".cache" for p in directory.iterdir())


def resolve_weights(
    local_dir: str | os.PathLike[str] = DEFAULT_LOCAL_DIR, env: Mapping[str, str] | None = None
) -> Path:
    """Return a local snapshot directory, downloading it into ``local_dir`` if needed."""
    env = os.environ if env is None else env
    explicit = env.get("DEEPSEEK_VL2_WEIGHTS")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise WeightsUnavailableError(
                f"DEEPSEEK_VL2_WEIGHTS={explicit!r} is not a directory. Point it at a Hugging Face "
                "snapshot of deepseek-ai/deepseek-vl2-small (config.json, tokenizer.json, "
                "*.safetensors), or unset it to use ./weights."
            )
        log.info("weights: using DEEPSEEK_VL2_WEIGHTS=%s", path)
        return path
    local = Path(local_dir)
    if _has_files(local) and not _is_unfinished_download(local):
        log.info("weights: using local snapshot %s", local.resolve())
        return local
    repo = env.get("DEEPSEEK_VL2_REPO") or DEFAULT_REPO
    revision = env.get("DEEPSEEK_VL2_REVISION") or DEFAULT_REVISION
    return download_weights(local, repo=repo, revision=revision)


def download_weights(
    local_dir: str | os.PathLike[str], repo: str = DEFAULT_REPO, revision: str = DEFAULT_REVISION
) -> Path:
    """Download (or resume) ``repo@revision`` into ``local_dir``; raise a helpful error on failure."""
    from huggingface_hub import snapshot_download  # only needed when downloading

    local = Path(local_dir)
    log.info(
        "weights: downloading %s@%s into %s (tens of GB for deepseek-vl2-small; resumable)",
        repo,
        revision,
        local.resolve(),
    )
    start = time.perf_counter()
    try:
        snapshot_download(repo, revision=revision, local_dir=local, allow_patterns=ALLOW_PATTERNS)
    except Exception as exc:  # network, auth, offline mode, disk: all end in the same advice
        log.debug("snapshot_download failed", exc_info=exc)
        raise WeightsUnavailableError(
            f"Could not download the weights {repo}@{revision} into {local.resolve()}: "
            f"{download_failure_reason(exc)}.\n{ADVICE}; otherwise check the network, "
            "HF_HUB_OFFLINE, and HF_TOKEN (gated or private repos)."
        ) from None
    (local / COMPLETE_MARKER).write_text(f"{repo}@{revision}\n")
    log.info("weights: download finished in %.0f s", time.perf_counter() - start)
    return local


TINY_CHECKPOINT = "tests/data/golden/cases/mla/model"
CLI_WAYS_FORWARD = (
    "Ways forward:\n"
    "  - on a machine with network: `make weights` (or `python -m deepseek_vl2_runtime.hub "
    "--dest weights`), resumable, or copy a snapshot (config.json, tokenizer.json, "
    "*.safetensors) into ./weights\n"
    "  - a snapshot elsewhere: `make predict WEIGHTS=/path/to/snapshot` (the server: "
    "DEEPSEEK_VL2_WEIGHTS=/path/to/snapshot make serve)\n"
    f"  - try it offline on the tiny random test checkpoint (gibberish answers): "
    f"`make predict WEIGHTS={TINY_CHECKPOINT}`"
)


def main(argv: list[str] | None = None) -> int:
    """`python -m deepseek_vl2_runtime.hub` / `make weights`: download; on failure print one
    short reason and the ways forward (no traceback) and return 1."""
    parser = argparse.ArgumentParser(description="Download the DeepSeek-VL2 weights for Cog.")
    parser.add_argument("--dest", default=str(DEFAULT_LOCAL_DIR), help="target directory")
    parser.add_argument("--repo", default=os.environ.get("DEEPSEEK_VL2_REPO") or DEFAULT_REPO)
    parser.add_argument(
        "--revision", default=os.environ.get("DEEPSEEK_VL2_REVISION") or DEFAULT_REVISION
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = download_weights(args.dest, repo=args.repo, revision=args.revision)
    except WeightsUnavailableError as exc:
        reason = str(exc).split("\n", 1)[0]  # the server's advice line is not the CLI's
        print(f"error: {reason}\n{CLI_WAYS_FORWARD}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
