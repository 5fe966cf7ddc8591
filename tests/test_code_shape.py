"""The code as the next engineer reads it: the README's map names every folder of the package and every module
at its top (and nothing that is not there), imports never run in a circle (lazy imports inside functions count
too), and no module is over 400 lines unless the README's "How it works" says why."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Where each installed package's files are in the checkout (pyproject.toml's package-dir).
PACKAGES = {"llm_flash_moe": ROOT / "llm_flash_moe", "llm_flash_moe.conversion": ROOT / "conversion",
            "llm_flash_moe.kernels": ROOT / "kernels"}
MAX_LINES = 400


def modules() -> dict:
    """Installed module name -> its file in the checkout (package ``__init__`` files included)."""
    found = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if package == "llm_flash_moe" and parts[0] in ("conversion", "kernels"):
                continue
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known) -> set:
    """The package modules ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def how_it_works() -> str:
    text = README.read_text()
    return text[text.index("## How it works"):text.index("## Development")]


def test_no_import_cycle():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself works


def installed_path(name: str, path: Path) -> str:
    """A module's file as the README spells it: ``llm_flash_moe/bank/expert_bank.py``, ``llm_flash_moe/bank/``."""
    if path.name == "__init__.py" and name != "llm_flash_moe":
        return name.replace(".", "/") + "/"
    return name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")


def test_readme_map_is_the_package():
    listed = re.findall(r"^\| `(llm_flash_moe/[\w/]+(?:\.py|/))` \|", how_it_works(), flags=re.M)
    assert len(listed) == len(set(listed)), "a line of the map is there twice"
    known = modules()
    existing = {installed_path(name, path) for name, path in known.items()}
    assert set(listed) <= existing, f"the map names what is not there: {sorted(set(listed) - existing)}"
    folders = {installed_path(name, path) for name, path in known.items()
               if path.name == "__init__.py" and name != "llm_flash_moe"}
    top = {installed_path(name, path) for name, path in known.items()
           if name.count(".") == 1 and path.name != "__init__.py"}
    top.add("llm_flash_moe/__init__.py")
    assert folders <= set(listed), f"the map has no line for these folders: {sorted(folders - set(listed))}"
    assert top <= set(listed), f"the map has no line for these top-level modules: {sorted(top - set(listed))}"


def test_long_modules_are_explained():
    section = how_it_works()
    explained = section[section.index("Modules over 400 lines"):]
    explained = explained[:explained.index("\n\n")]
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        short = name.replace("llm_flash_moe.", "").replace(".", "/") + ".py"
        if lines > MAX_LINES:
            assert f"`{short}`" in explained, f"{path} has {lines} lines and the README does not say why"
        else:
            assert f"`{short}`" not in explained, f"{short} is no longer over {MAX_LINES} lines"
