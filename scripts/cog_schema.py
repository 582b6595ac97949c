#!/usr/bin/env python
"""Write .cog/openapi_schema.json, the schema the coglet server validates requests against.

Since cog 0.17 the schema is produced by the Go `cog build`, which needs Docker; coglet only reads
the file (without it: no 422s, no /openapi.json, no SSE). This script builds the same document
from the predictor with the cog wheel's own introspection (`cog._inspector.create_predictor`,
`OutputType.json_type()`), laid out like cog's Go generator (pkg/schema/openapi.go): plain maps
with sorted keys; inputs, components and paths in declaration order. `@streaming` is a runtime
no-op, so it is found in the source with `ast` and sets `x-cog-streaming` on POST /predictions.

Only the predictor class is inspected: no weights, no GPU.

    python scripts/cog_schema.py           # (re)write .cog/openapi_schema.json
    python scripts/cog_schema.py --check   # exit 1 if the committed file is stale
"""

import argparse
import ast
import difflib
import inspect
import json
import sys
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"


class Ordered(dict):
    """A mapping whose key order is meaningful (kept as is); plain dicts get sorted keys."""


def _canonical(value):
    if isinstance(value, Ordered):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _number(x):
    """Integral floats as ints, as Go's encoding/json writes float64 (0, 1, 4096; 0.1 stays)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _title(name: str) -> str:
    return " ".join(word[:1].upper() + word[1:] for word in name.split("_") if word)


def predictor_ref() -> tuple[Path, str]:
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    ref = config.get("run") or config["predict"]
    file_name, class_name = ref.split(":")
    return ROOT / file_name, class_name


def is_streaming(source: Path, class_name: str) -> bool:
    """True if `class_name.run`/`.predict` carries @streaming / @cog.streaming (called or not)."""
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in (
                    "run",
                    "predict",
                ):
                    for deco in item.decorator_list:
                        target = deco.func if isinstance(deco, ast.Call) else deco
                        name = target.attr if isinstance(target, ast.Attribute) else None
                        name = target.id if isinstance(target, ast.Name) else name
                        if name == "streaming":
                            return True
    return False


def _input_property(field, accept: str | None) -> dict:
    from cog import _adt

    nullable = field.type.repetition in (
        _adt.Repetition.OPTIONAL,
        _adt.Repetition.OPTIONAL_REPEATED,
    )
    prop = {"x-order": field.order, "title": _title(field.name), **field.type.json_type()}
    if field.choices:
        raise NotImplementedError("choices inputs (enum components) are not used by this model")
    if field.default is not None or nullable:  # `int = None` without Optional: required, no default
        prop["default"] = _number(field.default)
    if nullable:
        prop["nullable"] = True
    optional = {
        "description": field.description,
        "minimum": None if field.ge is None else _number(field.ge),
        "maximum": None if field.le is None else _number(field.le),
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
        "deprecated": field.deprecated or None,
        "x-cog-accept": accept,
    }
    prop.update({k: v for k, v in optional.items() if v is not None})
    return prop


def build_schema() -> dict:
    source, class_name = predictor_ref()
    sys.path.insert(0, str(source.parent))
    from cog import _inspector

    with warnings.catch_warnings():  # BasePredictor/predict() deprecation notes: not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        info = _inspector.create_predictor(source.stem, class_name)
    cls = getattr(sys.modules[source.stem], class_name)
    method = cls.run if "run" in vars(cls) else cls.predict
    params = inspect.signature(method).parameters

    properties = Ordered()
    required = []
    for name, field in info.inputs.items():
        properties[name] = _input_property(field, getattr(params[name].default, "accept", None))
        if "default" not in properties[name] and not properties[name].get("nullable"):
            required.append(name)
    input_schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required

    ref = "#/components/schemas/"
    json_ok = {"application/json": {"schema": {}}}
    validation_error = {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": ref + "HTTPValidationError"}}},
    }
    date = {"type": "string", "format": "date-time"}
    predict_post = {
        "summary": "Predict",
        "description": "Run a single prediction on the model",
        "operationId": "predict_predictions_post",
        "requestBody": {
            "content": {"application/json": {"schema": {"$ref": ref + "PredictionRequest"}}}
        },
        "responses": {
            "200": {
                "description": "Successful Response",
                "content": {"application/json": {"schema": {"$ref": ref + "PredictionResponse"}}},
            },
            "422": validation_error,
        },
    }
    if is_streaming(source, class_name):
        predict_post["x-cog-streaming"] = True

    schemas = Ordered(
        Input=input_schema,
        Output=info.output.json_type(),
        PredictionRequest={
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": ref + "Input"},
            },
        },
        PredictionResponse={
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": ref + "Input"},
                "output": {"$ref": ref + "Output"},
                "id": {"title": "Id", "type": "string"},
                "version": {"title": "Version", "type": "string"},
                "created_at": {"title": "Created At", **date},
                "started_at": {"title": "Started At", **date},
                "completed_at": {"title": "Completed At", **date},
                "status": {"title": "Status", "type": "string"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        Status={
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        HTTPValidationError={
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": ref + "ValidationError"},
                }
            },
        },
        ValidationError={
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    )
    paths = Ordered(
        {
            "/": {
                "get": {
                    "summary": "Root",
                    "operationId": "root__get",
                    "responses": {
                        "200": {"description": "Successful Response", "content": json_ok}
                    },
                }
            },
            "/health-check": {
                "get": {
                    "summary": "Healthcheck",
                    "operationId": "healthcheck_health_check_get",
                    "responses": {
                        "200": {"description": "Successful Response", "content": json_ok}
                    },
                }
            },
            "/predictions": {"post": predict_post},
            "/predictions/{prediction_id}/cancel": {
                "post": {
                    "summary": "Cancel",
                    "operationId": "cancel_predictions__prediction_id__cancel_post",
                    "parameters": [
                        {
                            "required": True,
                            "schema": {"title": "Prediction Id", "type": "string"},
                            "name": "prediction_id",
                            "in": "path",
                        }
                    ],
                    "responses": {
                        "200": {"description": "Successful Response", "content": json_ok},
                        "422": validation_error,
                    },
                }
            },
        }
    )
    return _canonical(
        {
            "openapi": "3.0.2",
            "info": {"title": "Cog", "version": "0.1.0"},
            "paths": paths,
            "components": {"schemas": schemas},
        }
    )


def render() -> str:
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    parser.add_argument("--output", type=Path, default=SCHEMA_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            print(f"{args.output.relative_to(ROOT)} is up to date")
            return 0
        diff = difflib.unified_diff(
            current.splitlines(True), text.splitlines(True), "committed", "generated"
        )
        sys.stderr.write("".join(diff))
        sys.stderr.write(f"{args.output} is stale: run `python scripts/cog_schema.py`\n")
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
