"""Shared fixtures: tiny checkpoints of the real architectures, mlx-lm references, prepared models.

Everything is built once per test session under one temporary directory, and llm's user directory
(where prepared models are registered) points into it.
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from llm_flash_moe.synthetic.checkpoint import TinySpec, write_hf_checkpoint


@pytest.fixture(scope="session", autouse=True)
def llm_user_dir(tmp_path_factory):
    """Keep llm's logs.db and our registry out of the real user directory for the whole session."""
    path = tmp_path_factory.mktemp("llm-user")
    old = os.environ.get("LLM_USER_PATH")
    os.environ["LLM_USER_PATH"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LLM_USER_PATH", None)
    else:
        os.environ["LLM_USER_PATH"] = old


@pytest.fixture(scope="session", autouse=True)
def no_engine_by_default():
    """Tests run the model in the test process (keep_alive 0) unless they ask for the shared engine
    (tests/test_service.py sets LLM_FLASH_MOE_KEEP_ALIVE itself, and stops every engine it started)."""
    old = os.environ.get("LLM_FLASH_MOE_KEEP_ALIVE")
    os.environ["LLM_FLASH_MOE_KEEP_ALIVE"] = "0"
    yield
    if old is None:
        os.environ.pop("LLM_FLASH_MOE_KEEP_ALIVE", None)
    else:
        os.environ["LLM_FLASH_MOE_KEEP_ALIVE"] = old


def running(pid: int) -> bool:
    """Whether process ``pid`` runs: a zombie (exited, not yet reaped by the test that started it) does not."""
    from llm_flash_moe.service import protocol

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return protocol.alive(pid) if not Path("/proc/self").exists() else False


def stop_engines() -> list:
    """Stop every engine of the current llm user directory (what a test started); their pids."""
    import signal
    import time

    from llm_flash_moe.service import protocol

    pids = []
    directory = protocol.engines_dir()
    for path in directory.glob("*.json"):
        try:
            import json

            pid = json.loads(path.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        pids.append(pid)
        if running(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for pid in pids:
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    return pids


class ModelFactory:
    """Builds (once per session) HF checkpoints, mlx-lm-quantized references and prepared models."""

    def __init__(self, root: Path):
        self.root = root
        self._built = {}

    def _once(self, key, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def hf(self, dtype="bfloat16", layout="fused", shards=1, **spec) -> Path:
        """A tiny HF checkpoint (random weights, real key names) of the given dtype, layout and sharding."""
        spec = TinySpec(dtype=dtype, **spec)
        key = ("hf", spec, layout, shards)
        return self._once(key, lambda: write_hf_checkpoint(
            self.root / f"hf{len(self._built)}", spec, expert_layout=layout, num_shards=shards))

    def reference(self, hf_dir: Path, bits=4, group_size=64, resident_bits=4) -> Path:
        """mlx-lm's own converter on ``hf_dir``: experts at ``bits``/``group_size``, router and shared
        expert gate at 8 bits, everything else at ``resident_bits`` (group 64) — our conversion's recipe."""

        def build():
            from mlx_lm import convert

            def predicate(path, module):
                if ".switch_mlp." in path:
                    return {"group_size": group_size, "bits": bits, "mode": "affine"}
                if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
                    return {"group_size": 64, "bits": 8}
                return True

            out = self.root / f"ref{len(self._built)}"
            kwargs = dict(quantize=resident_bits < 16, q_bits=resident_bits if resident_bits < 16 else None,
                          q_group_size=64, quant_predicate=predicate)
            if resident_bits == 16:
                kwargs = dict(quantize=False)
            convert(str(hf_dir), str(out), **kwargs)
            return out

        return self._once(("ref", hf_dir, bits, group_size, resident_bits), build)

    def prepared(self, source: Path, bits=4, group_size=64, resident_bits=4, **options) -> Path:
        """``prepare`` on ``source`` into its own directory (registered under a unique name)."""
        from llm_flash_moe.conversion.prepare import PrepareOptions, prepare

        def build():
            n = len(self._built)
            out = self.root / f"prepared{n}"
            prepare(PrepareOptions(source=str(source), name=f"m{n}", output=out, bits=bits,
                                   group_size=group_size, resident_bits=resident_bits, **options),
                    echo=lambda _: None)
            return out

        return self._once(("prepared", source, bits, group_size, resident_bits, tuple(sorted(options.items()))),
                          build)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> ModelFactory:
    return ModelFactory(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny prepared model (tiny tokenizer) for the plugin tests; registered by each test's user dir."""
    from llm_flash_moe.conversion.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("tiny-model")
    source = write_hf_checkpoint(root / "source", TinySpec(), tokenizer="tiny")
    saved = os.environ.get("LLM_USER_PATH")
    os.environ["LLM_USER_PATH"] = str(root / "prepare-user-dir")  # prepare registers it there; ignored
    try:
        prepare(PrepareOptions(source=str(source), name="tiny", output=root / "flash"), echo=lambda s: None)
    finally:
        if saved is None:
            os.environ.pop("LLM_USER_PATH", None)
        else:
            os.environ["LLM_USER_PATH"] = saved
    return root / "flash"


@pytest.fixture(scope="session")
def vision_source(tmp_path_factory) -> Path:
    """A tiny random Qwen3.5-MoE checkpoint (float32: mlx-vlm's DeltaNet prefill needs fp32 on the CPU) with a
    tiny vision encoder under the HF release's key names."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("vision-hf"), TinySpec(dtype="float32"), vision=True)


@pytest.fixture(scope="session")
def vision_model(models, vision_source) -> Path:
    return models.prepared(vision_source)


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> dict:
    """Random pictures: two of the same size (the same image tokens), one of another size, a GIF; a file that
    is not a picture, a text file."""
    import numpy as np

    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(7)
    out = {}
    for name, (h, w) in {"a.png": (24, 32), "b.jpg": (24, 32), "c.webp": (40, 16), "d.gif": (16, 16)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / name)
        out[name.split(".")[0]] = root / name
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    (root / "notes.txt").write_text("not a picture")
    out["broken"], out["text"] = root / "broken.png", root / "notes.txt"
    return out


@pytest.fixture
def spy(monkeypatch):
    """Records each pass through the plugin's model: the whole prompt (cached part included), the
    tokenizer, the Turn, and the responses mlx_lm.stream_generate yielded."""
    from llm_flash_moe.engine import session

    calls = []
    real = session.Turn.steps

    def steps(turn, max_tokens, sampler):
        call = {"prompt": list(turn.prompt_ids), "tokenizer": turn.flash.tokenizer, "responses": [], "turn": turn}
        calls.append(call)
        for response in real(turn, max_tokens, sampler):
            call["responses"].append(response)
            yield response

    monkeypatch.setattr(session.Turn, "steps", steps)
    return calls


@pytest.fixture
def llm_user(tmp_path, monkeypatch) -> Path:
    """A fresh, empty llm user directory, with errors shown as llm shows them to users."""
    path = tmp_path / "llm-user"
    path.mkdir()
    monkeypatch.setenv("LLM_USER_PATH", str(path))
    monkeypatch.delenv("LLM_RAISE_ERRORS", raising=False)
    return path


@pytest.fixture
def user_path(llm_user, monkeypatch, tiny_model) -> Path:
    """A fresh llm user directory with the tiny model registered as "tiny", no prompt-cache state."""
    from llm_flash_moe.engine import prompt_cache
    from llm_flash_moe import registry

    monkeypatch.delenv(prompt_cache.DISK_ENV, raising=False)
    registry.register("tiny", tiny_model)
    prompt_cache.MEMORY.clear()
    yield llm_user
    prompt_cache.MEMORY.clear()


def record_reads(bank) -> Counter:
    """Counts (layer, expert) of every record the bank reads from now on."""
    reads = Counter()
    fill = bank._fill

    def counted(p, layer, experts, slots, ahead=False):
        reads.update((layer, int(e)) for e in experts)
        return fill(p, layer, experts, slots, ahead)

    bank._fill = counted
    return reads


def logged_turns(user_dir: Path) -> list:
    """The rows of llm's ``turns`` table in ``user_dir``'s logs.db, oldest first, as dicts (none before the
    first response is logged). Test modules import it: ``from conftest import logged_turns``."""
    if not (user_dir / "logs.db").exists():
        return []
    db = sqlite3.connect(user_dir / "logs.db")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("select * from turns order by id")]
    finally:
        db.close()


PROGRESS_BARS = ("Preparing ", "Verifying ")  # tqdm's bars on stderr: legitimate output before an error


def run(*args, input=None):
    """``llm ARGS`` in this process (llm's CLI through click's runner), exceptions not caught."""
    from click.testing import CliRunner
    from llm.cli import cli

    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def one_line_error(result, warnings: bool = False) -> str:
    """The single ``Error: ...`` line of a failed command (nothing else but a progress bar, and ``Warning:``
    lines when ``warnings``; no traceback)."""
    out = result.output.strip()
    assert result.exit_code != 0, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith(PROGRESS_BARS)
             and not (warnings and line.startswith("Warning: "))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    return lines[0]

