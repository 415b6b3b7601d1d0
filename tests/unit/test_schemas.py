"""``schemas/`` is the wire contract for workers in other languages: it must equal what
``scripts/schemas.py`` generates from the models now, be valid draft 2020-12, and accept exactly the
messages the decoder accepts (its examples decode; typical mistakes fail both)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from orchestrator_kafka import codec
from orchestrator_kafka.errors import DecodeError
from orchestrator_kafka.models import MESSAGE_TYPES

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "schemas"
NAMES = [*MESSAGE_TYPES, "message"]


def _load_generator() -> ModuleType:
    # scripts/ is not a package: load the generator from its file, as `python scripts/schemas.py` runs it.
    spec = importlib.util.spec_from_file_location("schemas_generator", ROOT / "scripts" / "schemas.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    return loaded


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(_schema(name))


def test_committed_schemas_are_what_the_generator_writes() -> None:
    problems = gen.differences(SCHEMA_DIR)
    assert not problems, "schemas/ is out of date with the models; run scripts/schemas and commit:\n" + (
        "\n".join(problems)
    )


def test_check_fails_on_a_changed_missing_or_stale_file_and_write_repairs_it(tmp_path: Path) -> None:
    directory = tmp_path / "schemas"
    assert gen.main(["--dir", str(directory)]) == 0
    assert gen.main(["--check", "--dir", str(directory)]) == 0

    target = directory / "step.command.schema.json"
    target.write_text(target.read_text().replace('"title": "StepCommand', '"title": "Edited'))
    (directory / "saga.cancel.schema.json").unlink()
    (directory / "step.retired.schema.json").write_text("{}\n")
    problems = gen.differences(directory)
    assert [p.split("\n")[0] for p in problems] == [
        "missing: saga.cancel.schema.json",
        "differs: step.command.schema.json",
        "not generated (stale): step.retired.schema.json",
    ]
    assert '-  "title": "Edited (step.command)",' in problems[1]
    assert '+  "title": "StepCommand (step.command)",' in problems[1]
    assert gen.main(["--check", "--dir", str(directory)]) == 1

    assert gen.main(["--dir", str(directory)]) == 0
    assert gen.differences(directory) == []
    assert not (directory / "step.retired.schema.json").exists()


def test_generation_is_deterministic() -> None:
    assert gen.generate() == gen.generate()
    for name, text in gen.generate().items():
        assert text.endswith("}\n") and not text.endswith("\n\n"), name
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@pytest.mark.parametrize("name", NAMES)
def test_each_schema_is_valid_draft_2020_12_with_id_title_description_and_examples(name: str) -> None:
    schema = _schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://orchestrator-kafka.dev/schemas/1.0/{name}.schema.json"
    assert schema["title"] and schema["description"] and schema["examples"]
    # Only JSON Schema's own keywords, so strict validators in other languages (ajv) load it too.
    assert "discriminator" not in json.dumps(schema)


def test_every_message_type_has_a_schema_and_no_more() -> None:
    names = {p.name.removesuffix(".schema.json") for p in SCHEMA_DIR.glob("*.schema.json")}
    assert names == set(NAMES)


@pytest.mark.parametrize("event_type", list(MESSAGE_TYPES))
def test_the_example_validates_and_decodes_to_its_model(event_type: str) -> None:
    (example,) = _schema(event_type)["examples"]
    _validator(event_type).validate(example)
    _validator("message").validate(example)
    # The format keyword is not checked without extra packages: check date-time (with an offset) here.
    assert datetime.fromisoformat(example["occurred_at"]).tzinfo is not None
    decoded = codec.decode(orjson.dumps(example))
    assert type(decoded) is MESSAGE_TYPES[event_type]
    assert decoded == gen.examples()[event_type]
    # What the Python side writes for the decoded message is the example again, byte for byte in JSON terms.
    assert orjson.loads(codec.encode(decoded)) == example


def test_the_combined_schema_holds_every_example_once() -> None:
    found = [example["event_type"] for example in _schema("message")["examples"]]
    assert sorted(found) == sorted(MESSAGE_TYPES)


def _command() -> dict[str, Any]:
    example: dict[str, Any] = copy.deepcopy(_schema("step.command")["examples"][0])
    return example


def _unknown_field(m: dict[str, Any]) -> None:
    m["body"]["priority"] = "high"


def _unknown_envelope_field(m: dict[str, Any]) -> None:
    m["trace_id"] = "abc"


def _missing_required(m: dict[str, Any]) -> None:
    del m["body"]["command_id"]


def _missing_event_type(m: dict[str, Any]) -> None:
    del m["event_type"]


def _wrong_event_type(m: dict[str, Any]) -> None:
    m["event_type"] = "step.result"


def _attempt_zero(m: dict[str, Any]) -> None:
    m["body"]["attempt"] = 0


def _bad_kind(m: dict[str, Any]) -> None:
    m["body"]["kind"] = "undo"


def _empty_id(m: dict[str, Any]) -> None:
    m["transaction_id"] = ""


def _bad_schema_version(m: dict[str, Any]) -> None:
    m["schema_version"] = "1"


@pytest.mark.parametrize(
    "mutate",
    [
        _unknown_field,
        _unknown_envelope_field,
        _missing_required,
        _missing_event_type,
        _wrong_event_type,
        _attempt_zero,
        _bad_kind,
        _empty_id,
        _bad_schema_version,
    ],
)
def test_a_broken_command_fails_the_schema_and_the_decoder(mutate: Any) -> None:
    message = _command()
    mutate(message)
    assert not _validator("step.command").is_valid(message)
    with pytest.raises(DecodeError):
        codec.decode(orjson.dumps(message))


def test_a_result_with_a_wrong_status_or_an_oversized_error_type_fails() -> None:
    validator = _validator("step.result")
    result: dict[str, Any] = _schema("step.result")["examples"][0]
    bad_status = copy.deepcopy(result)
    bad_status["body"]["status"] = "ok"
    long_type = copy.deepcopy(result)
    long_type["body"]["error"]["type"] = "E" * 501
    for message in (bad_status, long_type):
        assert not validator.is_valid(message)
        with pytest.raises(DecodeError):
            codec.decode(orjson.dumps(message))


def test_the_combined_schema_refuses_an_unknown_event_type() -> None:
    message = _command()
    message["event_type"] = "step.progress"
    assert not _validator("message").is_valid(message)
    with pytest.raises(DecodeError) as info:
        codec.decode(orjson.dumps(message))
    assert info.value.reason == codec.UNKNOWN_EVENT_TYPE


def test_a_newer_major_version_is_valid_json_but_dead_lettered() -> None:
    # The schema cannot know the reader's version: the pattern admits "2.0", the decoder refuses it.
    message = _command()
    message["schema_version"] = "2.0"
    assert _validator("step.command").is_valid(message)
    with pytest.raises(DecodeError) as info:
        codec.decode(orjson.dumps(message))
    assert info.value.reason == codec.UNSUPPORTED_SCHEMA_VERSION


def test_the_readme_examples_are_valid_messages() -> None:
    text = (SCHEMA_DIR / "README.md").read_text(encoding="utf-8")
    blocks = text.split("```json\n")[1:]
    assert len(blocks) == 2
    for block in blocks:
        message = json.loads(block.split("```", 1)[0])
        _validator("message").validate(message)
        codec.decode(orjson.dumps(message))
