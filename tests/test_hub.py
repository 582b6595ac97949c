"""Weights resolution: precedence and the offline failure message. No network is used."""

from __future__ import annotations

import re

import huggingface_hub
import huggingface_hub.constants
import pytest

from deepseek_vl2_runtime import hub
from deepseek_vl2_runtime.errors import CheckpointError


@pytest.fixture
def offline(monkeypatch):
    """Make any Hub access fail fast: offline mode, and an endpoint nobody listens on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fake_download(monkeypatch):
    """Replace snapshot_download by a recorder that writes a one-file snapshot."""
    calls = []

    def snapshot_download(repo_id, *, revision, local_dir, allow_patterns, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "local_dir": local_dir})
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / "config.json").write_text("{}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def _snapshot(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_env_var_wins_over_local_weights(tmp_path, fake_download):
    explicit = _snapshot(tmp_path / "explicit")
    _snapshot(tmp_path / "weights")
    got = hub.resolve_weights(tmp_path / "weights", env={"DEEPSEEK_VL2_WEIGHTS": str(explicit)})
    assert got == explicit
    assert fake_download == []


def test_env_var_that_is_not_a_directory_is_a_clear_error(tmp_path, fake_download):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match=r"DEEPSEEK_VL2_WEIGHTS=.*nope.*is not a directory"):
        hub.resolve_weights(tmp_path / "weights", env={"DEEPSEEK_VL2_WEIGHTS": str(missing)})
    assert fake_download == []


def test_local_weights_used_without_download(tmp_path, fake_download):
    local = _snapshot(tmp_path / "weights")
    assert hub.resolve_weights(local, env={}) == local
    assert fake_download == []


def test_default_local_dir_is_relative_to_cwd(tmp_path, monkeypatch, fake_download):
    monkeypatch.chdir(tmp_path)
    _snapshot(tmp_path / "weights")
    assert hub.resolve_weights(env={}).resolve() == (tmp_path / "weights").resolve()
    assert fake_download == []


@pytest.mark.parametrize("state", ["absent", "empty", "unfinished"])
def test_download_when_no_usable_local_snapshot(tmp_path, fake_download, state):
    local = tmp_path / "weights"
    if state != "absent":
        local.mkdir()
    if state == "unfinished":  # what an interrupted snapshot_download(local_dir=...) leaves
        (local / ".cache" / "huggingface").mkdir(parents=True)
        (local / "config.json").write_text("{}")
    got = hub.resolve_weights(local, env={})
    assert got == local
    assert fake_download == [
        {"repo_id": "deepseek-ai/deepseek-vl2-small", "revision": "main", "local_dir": local}
    ]
    assert (
        local / hub.COMPLETE_MARKER
    ).read_text().strip() == "deepseek-ai/deepseek-vl2-small@main"


def test_finished_download_is_not_downloaded_again(tmp_path, fake_download):
    local = tmp_path / "weights"
    hub.resolve_weights(local, env={})
    (local / ".cache" / "huggingface").mkdir(parents=True)
    hub.resolve_weights(local, env={})
    assert len(fake_download) == 1


def test_repo_and_revision_overrides(tmp_path, fake_download):
    env = {"DEEPSEEK_VL2_REPO": "someone/vl2-fork", "DEEPSEEK_VL2_REVISION": "abc123"}
    hub.resolve_weights(tmp_path / "weights", env=env)
    assert fake_download[0]["repo_id"] == "someone/vl2-fork"
    assert fake_download[0]["revision"] == "abc123"


def test_offline_download_fails_with_advice(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.WeightsUnavailableError) as info:
        hub.resolve_weights(env={})
    message = str(info.value)
    assert "deepseek-ai/deepseek-vl2-small@main" in message
    for advice in ("./weights", "DEEPSEEK_VL2_WEIGHTS", "HF_TOKEN", "network"):
        assert advice in message
    assert not (tmp_path / "weights" / hub.COMPLETE_MARKER).exists()


@pytest.fixture
def unreachable(monkeypatch):
    """No network: an endpoint nobody listens on, offline mode off (as on a machine without
    network that was not told so)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


def test_failed_download_reads_as_one_reason_without_machinery(tmp_path, monkeypatch, unreachable):
    """What coglet's health check shows for a failed setup is "{type's __qualname__}: {message}":
    a label, one line saying why (no chained library errors or class names), one of advice."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.WeightsUnavailableError) as info:
        hub.resolve_weights(env={})
    shown = f"{type(info.value).__qualname__}: {info.value}"
    reason, advice = shown.splitlines()
    assert reason == (
        "Weights unavailable: Could not download the weights deepseek-ai/deepseek-vl2-small@main"
        f" into {tmp_path / 'weights'}: the Hugging Face Hub at http://127.0.0.1:9 could not be "
        "reached ([Errno 111] Connection refused)."
    )
    assert "DEEPSEEK_VL2_WEIGHTS" in advice
    assert "./weights" in advice
    assert not re.search(r"[A-Za-z]+(Error|Exception)\b", shown), shown
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_offline_mode_is_named_as_the_reason(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        hub.WeightsUnavailableError, match="offline mode is on \\(HF_HUB_OFFLINE\\)"
    ):
        hub.resolve_weights(env={})


def test_cli_prints_a_short_message_with_every_way_forward(
    tmp_path, monkeypatch, unreachable, capsys
):
    """`make weights` / `make predict` without network: no traceback, the reason, and how to go
    on: `make weights` elsewhere, WEIGHTS=... for `make predict`, the tiny checkpoint."""
    monkeypatch.chdir(tmp_path)
    assert hub.main(["--dest", "weights"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert len(err.splitlines()) <= 6, err
    assert err.startswith("error: Could not download the weights")
    assert "could not be reached" in err
    for way in (
        "make weights",
        "make predict WEIGHTS=/path/to/snapshot",
        "make predict WEIGHTS=tests/data/golden/cases/mla/model",
        "DEEPSEEK_VL2_WEIGHTS=/path/to/snapshot make serve",
    ):
        assert way in err, err
    assert not (tmp_path / "weights" / hub.COMPLETE_MARKER).exists()


def test_tiny_checkpoint_named_in_the_advice_exists():
    from paths import REPO_ROOT

    assert (REPO_ROOT / hub.TINY_CHECKPOINT / "config.json").is_file()
