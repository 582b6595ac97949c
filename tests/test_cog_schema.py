"""The Cog packaging files: generated OpenAPI schema, cog.yaml, pinned requirements."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml

from cog_server import INPUT_ORDER
from paths import REPO_ROOT, TESTS_DATA

SCHEMA_FILE = REPO_ROOT / ".cog" / "openapi_schema.json"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


@pytest.fixture(scope="module")
def inputs(schema) -> dict:
    return schema["components"]["schemas"]["Input"]


@pytest.mark.subprocess
def test_committed_schema_is_up_to_date():
    """`python scripts/cog_schema.py --check` as `make schema-check` runs it (a fresh process;
    the in-process test below also compares the generated schema with the committed one)."""
    result = subprocess.run(
        [sys.executable, "scripts/cog_schema.py", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_on_a_stale_schema(tmp_path, capsys):
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import cog_schema

    stale = tmp_path / "schema.json"
    stale.write_text(SCHEMA_FILE.read_text().replace('"default": 0.1', '"default": 0.2'))
    assert cog_schema.main(["--check", "--output", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "is stale" in err
    assert any(line.startswith("-") and '"default": 0.2' in line for line in err.splitlines())
    assert any(line.startswith("+") and '"default": 0.1' in line for line in err.splitlines())
    assert cog_schema.main(["--output", str(stale)]) == 0
    assert stale.read_text() == SCHEMA_FILE.read_text()


def test_inputs_in_order_with_required_first(inputs):
    props = inputs["properties"]
    assert list(props) == INPUT_ORDER
    assert [props[name]["x-order"] for name in INPUT_ORDER] == list(range(len(INPUT_ORDER)))
    assert inputs["required"] == ["image", "prompt"]


@pytest.mark.parametrize(
    ("name", "type_", "default", "minimum", "maximum"),
    [
        ("temperature", "number", 0.1, 0, 1),
        ("top_p", "number", 0.9, 0, 1),
        ("repetition_penalty", "number", 1.1, 0, 2),  # 0 kept for compatibility; predict rejects
        ("max_length_tokens", "integer", 2048, 0, 4096),
        ("top_k", "integer", 50, 0, 1000),
    ],
)
def test_numeric_inputs(inputs, name, type_, default, minimum, maximum):
    prop = inputs["properties"][name]
    assert (prop["type"], prop["default"]) == (type_, default)
    assert (prop["minimum"], prop["maximum"]) == (minimum, maximum)


def test_optional_inputs_are_nullable_and_not_required(inputs):
    props = inputs["properties"]
    assert props["seed"] == props["seed"] | {"type": "integer", "nullable": True, "minimum": 0}
    assert props["seed"]["default"] is None
    assert "maximum" not in props["seed"]
    for name in ("image", "image_2", "image_3"):
        assert props[name]["type"] == "string"
        assert props[name]["format"] == "uri"
        assert props[name]["x-cog-accept"] == "image/*"
    for name in ("image_2", "image_3"):
        assert props[name]["nullable"] is True
        assert props[name]["default"] is None
    assert props["prompt"]["type"] == "string"
    assert "default" not in props["prompt"]


# The published model's inputs (lucataco/cog-deepseek-vl2 predict.py), which clients rely on.
LEGACY_INPUTS = {
    "image": {"type": "string", "format": "uri"},
    "prompt": {"type": "string"},
    "temperature": {"type": "number", "default": 0.1, "minimum": 0, "maximum": 1},
    "top_p": {"type": "number", "default": 0.9, "minimum": 0, "maximum": 1},
    "repetition_penalty": {"type": "number", "default": 1.1, "minimum": 0, "maximum": 2},
    "max_length_tokens": {"type": "integer", "default": 2048, "minimum": 0, "maximum": 4096},
}


def test_backwards_compatible_with_the_published_inputs(inputs):
    """cog-safe-push's rules: no removed inputs, no type or default changes, no narrower
    ranges, no new required inputs, and the old inputs keep their order."""
    props = inputs["properties"]
    for name, old in LEGACY_INPUTS.items():
        new = props[name]
        for key in ("type", "format", "default"):
            assert new.get(key) == old.get(key), (name, key)
        assert new.get("minimum", float("-inf")) <= old.get("minimum", float("-inf")), name
        assert new.get("maximum", float("inf")) >= old.get("maximum", float("inf")), name
    assert set(inputs["required"]) <= {"image", "prompt"}
    assert list(props)[: len(LEGACY_INPUTS)] == list(LEGACY_INPUTS)


def test_every_input_has_a_title_and_a_description(inputs):
    for name, prop in inputs["properties"].items():
        assert prop["title"], name
        assert len(prop.get("description", "")) >= 20, f"{name}: missing/short description"


def test_output_is_a_concatenated_string_iterator(schema):
    assert schema["components"]["schemas"]["Output"] == {
        "title": "Output",
        "type": "array",
        "items": {"type": "string"},
        "x-cog-array-type": "iterator",
        "x-cog-array-display": "concatenate",
    }


def test_openapi_document_shape(schema):
    assert schema["openapi"] == "3.0.2"
    post = schema["paths"]["/predictions"]["post"]
    assert post["x-cog-streaming"] is True  # SSE needs it (predict is @streaming)
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictionRequest"
    }
    assert "/predictions/{prediction_id}/cancel" in schema["paths"]
    for name in ("PredictionRequest", "PredictionResponse", "Status", "HTTPValidationError"):
        assert name in schema["components"]["schemas"]


def test_cog_yaml_is_valid_and_pinned():
    config = yaml.safe_load((REPO_ROOT / "cog.yaml").read_text())
    config_schema = json.loads((TESTS_DATA / "cog-config-schema-v1.0.json").read_text())
    jsonschema.validate(config, config_schema)
    build = config["build"]
    assert build["gpu"] is True
    assert build["sdk_version"] == "0.23.1"
    assert build["python_version"] == "3.11"
    assert re.fullmatch(r"1[2-9]\.\d+", build["cuda"])
    assert build["python_requirements"] == "requirements.txt"
    assert "run" not in build  # no downloads at build time
    assert "python_packages" not in build
    assert config["predict"] == "predict.py:Predictor"


def test_cog_yaml_typos_are_caught():
    config_schema = json.loads((TESTS_DATA / "cog-config-schema-v1.0.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"build": {"gpus": True, "python_version": "3.11"}}, config_schema)


def _requirements(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.+\-]*)", line)
            assert match, f"{name}: not pinned with ==: {line!r}"
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_requirements_are_pinned_and_complete():
    pins = _requirements("requirements.txt")
    assert pins["cog"] == pins["coglet"] == "0.23.1"
    for package in ("torch", "safetensors", "tokenizers", "pillow", "numpy", "huggingface-hub"):
        assert package in pins
    dev = _requirements("requirements-dev.txt")
    for package in ("pytest", "hypothesis", "ruff", "jsonschema", "requests", "pyyaml"):
        assert package in dev


def test_installed_cog_matches_the_pins():
    from importlib.metadata import version

    assert version("cog") == version("coglet") == _requirements("requirements.txt")["cog"]


def test_installed_torch_is_the_pinned_version():
    """The tests run on the torch version the Cog image installs (a +cpu build counts)."""
    import torch

    assert torch.__version__.split("+")[0] == _requirements("requirements.txt")["torch"]


def test_setup_script_installs_torch_from_requirements():
    """One pin: scripts/setup_venv.sh has no torch version of its own."""
    script = (REPO_ROOT / "scripts" / "setup_venv.sh").read_text()
    assert "-r requirements.txt" in script
    assert not re.search(r"torch\s*==", script)
