"""Which prepared models exist and where: one small JSON file under llm's user directory.

``register_models`` runs on every llm command, so it reads only this file (never a manifest).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
from pathlib import Path
from typing import Dict, Optional

from .errors import FlashMoeError
from .flash_layout import DAMAGED_REMEDY, MANIFEST_NAME, PARTIAL_DIR, write_json_atomic
from .integrity import is_ours, read_json, set_aside

FLAGSHIP_NAME = "qwen397"
FLAGSHIP_SOURCE = "mlx-community/Qwen3.5-397B-A17B-4bit"
FLAGSHIP_EXPERTS_PER_TOKEN = 4
# What `llm flash-moe prepare` (flagship defaults: 4-bit experts, group 64, 4-bit resident) writes,
# and what it downloads first (the MLX 4-bit release) unless --delete-source drops each shard once used.
FLAGSHIP_PREPARED_GB = 223
FLAGSHIP_DOWNLOAD_GB = 223
MODEL_SUFFIX = "-flash"
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")


def root() -> Path:
    import llm

    return Path(llm.user_dir()) / "flash-moe"


def _registry_path() -> Path:
    return root() / "models.json"


def default_output(name: str) -> Path:
    return root() / name


def model_id(name: str) -> str:
    return name + MODEL_SUFFIX


def name_of(name_or_model_id: str) -> str:
    """A model's name from its name (`qwen397`) or its model id (`qwen397-flash`)."""
    if name_or_model_id.endswith(MODEL_SUFFIX) and name_or_model_id not in registered():
        return name_or_model_id[: -len(MODEL_SUFFIX)]
    return name_or_model_id


def not_prepared_message(name: str) -> str:
    """The one line shown when a listed model is used before `llm flash-moe prepare` made it."""
    if name == FLAGSHIP_NAME:
        return (
            f"{model_id(name)} is not prepared yet: run `llm flash-moe prepare` (downloads "
            f"{FLAGSHIP_SOURCE}; needs about {FLAGSHIP_PREPARED_GB + FLAGSHIP_DOWNLOAD_GB} GB free disk: "
            f"{FLAGSHIP_PREPARED_GB} GB prepared + {FLAGSHIP_DOWNLOAD_GB} GB download, or about "
            f"{FLAGSHIP_PREPARED_GB + 5} GB with `llm flash-moe prepare --delete-source`)"
        )
    return (
        f"{model_id(name)} is not prepared (no complete model in {default_output(name)}): run "
        f"`llm flash-moe prepare SOURCE --name {name}` again, or `llm flash-moe remove {name}`"
    )


def name_from_source(source: str) -> str:
    """`Qwen/Qwen3-30B-A3B` -> `qwen3-30b-a3b`; the flagship source -> `qwen397`."""
    if source == FLAGSHIP_SOURCE:
        return FLAGSHIP_NAME
    tail = Path(source.rstrip("/")).name
    name = re.sub(r"[^a-z0-9._-]+", "-", tail.lower()).strip("-._")
    if not name:
        raise FlashMoeError(f"cannot derive a model name from {source}; give one with --name")
    return name


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise FlashMoeError(f"model name {name!r} must use lowercase letters, digits, '.', '_' and '-'")
    if name in RESERVED_NAMES:
        raise FlashMoeError(f"model name {name!r} is reserved for the plugin's own files; choose another --name")
    return name


REGISTRY_FIX = ("repair it or move it aside: the next `llm flash-moe prepare` keeps the damaged copy aside and "
                "registers again every model prepared in the default place")
# Names of the plugin's own entries next to the models' default directories: never a model's name.
RESERVED_NAMES = frozenset({"prompt-cache", "cluster", "bench", "models.json", "models.json.lock", "threads.json",
                            "models", "cache", "tmp"})


def _registry_problem(data) -> Optional[str]:
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
        return 'not {"models": {NAME: DIRECTORY}}'
    for name, path in data.get("models", {}).items():
        if not isinstance(path, str) or not path or not NAME_PATTERN.fullmatch(name):
            return f"entry {name!r}: {path!r} is not a model name and a directory"
    return None


def registered() -> Dict[str, Path]:
    """name -> directory of every registered model (complete or not: callers check the manifest).
    A damaged models.json is a FlashMoeError naming it (never an empty list: that would orphan models)."""
    data = read_json(_registry_path(), REGISTRY_FIX, default={}, check=_registry_problem)
    return {name: Path(path) for name, path in data.get("models", {}).items()}


def _registered_or_recovered() -> Dict[str, Path]:
    """What is registered; when models.json is damaged, it is set aside (with a warning saying where) and the
    models complete in their default directories are found again."""
    try:
        return registered()
    except FlashMoeError:
        aside = set_aside(_registry_path())
        found = {}
        for path in sorted(root().iterdir()) if root().exists() else []:
            if path.is_dir() and path.name not in RESERVED_NAMES and NAME_PATTERN.fullmatch(path.name):
                if (path / MANIFEST_NAME).exists() and is_ours(path):
                    found[path.name] = path
        print(f"Warning: {_registry_path()} was damaged: kept it as {aside} and registered again the models found "
              f"in {root()} ({', '.join(found) or 'none'}); run `prepare` again for a model prepared with --output",
              file=sys.stderr)
        return found


@contextlib.contextmanager
def _locked():
    """Serialize read-modify-write of the registry between processes (two prepares finishing at once)."""
    _registry_path().parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_registry_path().with_name("models.json.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def register(name: str, path: Path) -> None:
    with _locked():
        models = {k: str(v) for k, v in _registered_or_recovered().items()}
        models[name] = str(Path(path).resolve())
        write_json_atomic(_registry_path(), {"models": dict(sorted(models.items()))})


def unregister(name: str) -> None:
    with _locked():
        models = {k: str(v) for k, v in _registered_or_recovered().items() if k != name}
        write_json_atomic(_registry_path(), {"models": models})


def prepared() -> Dict[str, Path]:
    """Registered models whose manifest exists (a directory without a complete manifest never counts)."""
    return {name: path for name, path in registered().items() if (path / MANIFEST_NAME).exists()}


def unfinished() -> Dict[str, Path]:
    """Directories under ``root()`` where a `prepare` started and has not finished (no registration yet)."""
    try:
        found = {p.name: p for p in root().iterdir() if (p / PARTIAL_DIR).is_dir() and not (p / MANIFEST_NAME).exists()
                 and p.name not in RESERVED_NAMES}
    except OSError:
        return {}
    registered_dirs = {path.resolve() for path in registered().values()}
    return {name: path for name, path in sorted(found.items()) if path.resolve() not in registered_dirs}


def model_dir(name: str) -> Path:
    path = prepared().get(name)
    if path is None:
        known = registered().get(name)
        if known is not None and known.exists():
            raise FlashMoeError(f"{known} has no {MANIFEST_NAME} (it was deleted, or its `prepare` never finished); "
                                f"{DAMAGED_REMEDY}")
        raise FlashMoeError(f"no prepared model named {name!r}; see `llm flash-moe models`")
    return path
