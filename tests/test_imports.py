"""What `import smope` and the light commands import, checked in a fresh interpreter each.

torch, peft and transformers take seconds to import; `smope --help` and `import smope` must
not pay for them, and `smope report` (JSON, safetensors, matplotlib) must not load peft or
transformers. A future top-level import that pulls them in fails here.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import smope

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "peft", "transformers")


def loaded_after(code: str) -> list[str]:
    """The HEAVY modules in ``sys.modules`` after running ``code`` in a fresh interpreter from the repository root."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return ast.literal_eval(done.stdout.splitlines()[-1])


def test_import_smope_loads_no_heavy_package():
    assert loaded_after("import smope") == []


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["report", "--help"]])
def test_cli_help_loads_no_heavy_package(argv):
    code = f"from smope import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass"
    assert loaded_after(code) == []


def test_report_loads_neither_peft_nor_transformers(finished_run, tmp_path):
    code = f"from smope import cli\ncli.main(['report', {str(finished_run)!r}, '--out', {str(tmp_path)!r}])"
    loaded = loaded_after(code)
    assert "peft" not in loaded and "transformers" not in loaded
    assert (tmp_path / "summary.md").is_file()


def test_model_code_loads_no_peft_until_the_config_is_used():
    assert "peft" not in loaded_after("from smope import set_mode, PromptedAttention, count_parameters")
    assert "peft" in loaded_after("from smope import SMoPEConfig")


def test_every_public_name_resolves_and_is_listed():
    for name in smope.__all__:
        assert name in dir(smope)
        namespace: dict = {}
        exec(f"from smope import {name}", namespace)
        assert namespace[name] is getattr(smope, name)
    assert smope.__version__ and "__version__" in dir(smope)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        smope.not_a_name  # noqa: B018
