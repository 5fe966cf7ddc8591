"""A checkpoint whose config.json is valid JSON of the wrong shape is refused by `prepare` in one line.

Every shape the first user report listed, and every type swap of every field mlx-lm's Qwen3.5 model reads
from the real config (the tiny checkpoint's config.json has the real release's keys and value types): exit
status 1, one ``Error:`` line, no traceback, nothing registered and nothing left on disk.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from llm.cli import cli

from llm_flash_moe import registry
from llm_flash_moe.synthetic.checkpoint import TinySpec, write_hf_checkpoint

pytest.importorskip("mlx.core")
TextModelArgs = pytest.importorskip("mlx_lm.models.qwen3_5").TextModelArgs

NAME = "bad"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-config")
    return {t: write_hf_checkpoint(root / t, TinySpec(model_type=t), tokenizer="tiny", expert_layout=layout)
            for t, layout in (("qwen3_5_moe", "fused"), ("qwen3_moe", "per_expert"))}


@dataclasses.dataclass
class Whole:
    """config.json replaced by this JSON value."""

    value: object

    def __call__(self, config):
        return self


def with_config(source: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``source`` whose config.json is changed in place by ``edit(config)`` (or is a Whole's value)."""
    copy = tmp_path / "checkpoint"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    config = json.loads((copy / "config.json").read_text())
    edited = edit(config)
    (copy / "config.json").write_text(json.dumps(edited.value if isinstance(edited, Whole) else config))
    return copy


def assert_refused(source: Path, user: Path) -> str:
    """`prepare SOURCE --name bad` fails in one line and leaves nothing behind; returns the line."""
    result = CliRunner().invoke(cli, ["flash-moe", "prepare", str(source), "--name", NAME])
    out = result.output.strip()
    assert result.exit_code == 1, out
    assert "Traceback" not in out and isinstance(result.exception, SystemExit), (out, result.exception)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    assert NAME not in registry.registered()
    assert not registry.default_output(NAME).exists()
    assert not (user / "flash-moe").exists() or not any(p.name == NAME for p in (user / "flash-moe").iterdir())
    return lines[0]


def _set_text(field, value):
    def edit(config):
        config["text_config"][field] = value
    return edit


@pytest.mark.parametrize("model_type,edit,expected", [
    ("qwen3_5_moe", Whole([1, 2, 3]), "config.json is a list, not a JSON object"),
    ("qwen3_5_moe", Whole("x"), "config.json is a string, not a JSON object"),
    ("qwen3_5_moe", Whole(None), "config.json is null, not a JSON object"),
    ("qwen3_5_moe", lambda c: c.update(text_config=5), "text_config is a number, not a JSON object"),
    ("qwen3_5_moe", _set_text("num_experts", "x"), 'text_config.num_experts must be an integer, not "x"'),
    ("qwen3_moe", lambda c: c.update(num_experts="x"), 'num_experts must be an integer, not "x"'),
    ("qwen3_moe", lambda c: c.pop("head_dim"), "head_dim is missing"),
    ("qwen3_5_moe", lambda c: c["text_config"].pop("hidden_size"), "text_config.hidden_size is missing"),
    ("qwen3_5_moe", lambda c: c.update(quantization="x"), "quantization must be an object"),
    ("qwen3_5_moe", _set_text("eos_token_id", "x"), "eos_token_id must be an integer or a list of integers"),
])
def test_malformed_config_shapes(checkpoints, tmp_path, llm_user, model_type, edit, expected):
    line = assert_refused(with_config(checkpoints[model_type], tmp_path, edit), llm_user)
    assert expected in line, line
    assert "download the checkpoint's config.json again" in line


def _other_kinds(value) -> list:
    """JSON values of every kind the original value's kind can never be confused with."""
    if isinstance(value, bool):
        return ["x", [1], {"a": 1}]
    if isinstance(value, (int, float)):
        return ["x", [1], {"a": 1}]
    if isinstance(value, str):
        return [7, [1], {"a": 1}]
    if isinstance(value, list):
        return ["x", 7, {"a": 1}]
    if isinstance(value, dict):
        return ["x", 7, [1]]
    return []


def type_swaps(config: dict) -> list:
    """(path, value) for every type swap of every config field mlx-lm's qwen3_5_moe model reads."""
    read = {f.name for f in dataclasses.fields(TextModelArgs)}
    swaps = [(("model_type",), v) for v in _other_kinds(config["model_type"])]
    swaps += [(("text_config",), v) for v in _other_kinds(config["text_config"])]
    for field, value in sorted(config["text_config"].items()):
        if field in read:
            swaps += [(("text_config", field), v) for v in _other_kinds(value)]
    return swaps


def test_every_type_swap_in_the_qwen35_config_is_one_line(checkpoints, tmp_path, llm_user):
    source = checkpoints["qwen3_5_moe"]
    config = json.loads((source / "config.json").read_text())
    swaps = type_swaps(config)
    fields = {path for path, _ in swaps}
    assert len(fields) >= 25 and ("text_config", "rope_parameters") in fields  # the real config's fields
    for path, value in swaps:
        def edit(c, path=path, value=value):
            target = c
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        line = assert_refused(with_config(source, tmp_path, edit), llm_user)
        assert ".".join(path) in line or "model type" in line, (path, value, line)


def test_every_missing_shape_field_is_named(checkpoints, tmp_path, llm_user):
    """mlx-lm's Qwen3.5 arguments default every field (hidden_size 4096...): a config.json without one of the
    fields that set a weight's shape is refused naming it, not with a tensor's byte count."""
    from llm_flash_moe.engine.mlx_model import SHAPE_FIELDS

    source = checkpoints["qwen3_5_moe"]
    present = sorted(SHAPE_FIELDS & set(json.loads((source / "config.json").read_text())["text_config"]))
    assert len(present) == len(SHAPE_FIELDS)  # the tiny checkpoint has the real config's fields
    for field in present:
        line = assert_refused(with_config(source, tmp_path, lambda c, f=field: c["text_config"].pop(f)), llm_user)
        assert f"text_config.{field} is missing" in line, (field, line)
