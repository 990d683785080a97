"""docs/config.md is what tools/config_reference.py writes from the settings' help metadata, and every key has help."""

import dataclasses
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

from smope.runconfig import RunConfig, TrainConfig

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "config_reference.py"


@pytest.fixture(scope="module")
def reference() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_up_to_date(reference):
    assert reference.TARGET.read_text() == reference.render(), "docs/config.md is stale: run python tools/config_reference.py and commit it"


def test_every_setting_has_help(reference):
    assert reference.missing_help() == []


def test_every_key_has_a_row_and_every_method_key_a_reader(reference):
    text = reference.render()
    for _, key, value in reference.walk():
        if not dataclasses.is_dataclass(value):
            assert f"| `{key}` |" in text, key
    assert "| no method |" not in text


def test_check_fails_with_one_line_when_a_help_text_changes(reference, monkeypatch, capsys):
    assert reference.main(["--check"]) == 0
    lr = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr")
    monkeypatch.setattr(lr, "metadata", types.MappingProxyType({"help": "a new meaning"}))
    assert reference.main(["--check"]) == 1
    assert capsys.readouterr().err == "docs/config.md is stale: run python tools/config_reference.py and commit the result\n"


def test_a_field_without_help_is_named(reference, monkeypatch, capsys):
    seeds = next(f for f in dataclasses.fields(RunConfig) if f.name == "seeds")
    monkeypatch.setattr(seeds, "metadata", types.MappingProxyType({}))
    assert reference.missing_help() == ["seeds"]
    assert reference.main(["--check"]) == 1
    assert "config key 'seeds' has no help text" in capsys.readouterr().err


def test_the_script_runs_from_the_command_line():
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
