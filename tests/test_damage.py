"""Damage and hostile input: nothing of the user's is ever lost, nothing damaged is trusted blindly.

Every case asserts what a user sees: one ``Error:`` line (or a warning and a complete answer), no traceback,
nothing of the user's touched, and no answer from damaged weights. One tiny model is prepared once per module
and copied per case. The figures of the matrix (tried / refused / detected) are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import conftest
from conftest import PROGRESS_BARS, logged_turns, run
from llm_flash_moe.engine import prompt_cache, session
from llm_flash_moe import registry
from llm_flash_moe.flash_layout import MANIFEST_NAME, OWNER_MARKER

pytest.importorskip("mlx.core")

NAME = "dmg"
MODEL = "dmg-flash"
GREEDY = ["-o", "temperature", "0", "-o", "thinking", "0", "-o", "max_tokens", "4"]


def one_line_error(result) -> str:
    """The single ``Error: ...`` line of a failed command (besides progress bars and warnings; no traceback)."""
    return conftest.one_line_error(result, warnings=True)


def tree(directory: Path) -> dict:
    """Every file under ``directory`` (relative path -> bytes): what must stay untouched."""
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from llm_flash_moe.synthetic.checkpoint import TinySpec, write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("dmg-source") / "tiny", TinySpec(), tokenizer="tiny")


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    """The tiny model prepared once (as NAME), never used directly: each case damages a copy."""
    from llm_flash_moe.conversion.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("dmg-prepared")
    saved = os.environ.get("LLM_USER_PATH")
    os.environ["LLM_USER_PATH"] = str(root / "user")
    try:
        prepare(PrepareOptions(source=str(source), name=NAME, output=root / "out"), echo=lambda _: None)
    finally:
        os.environ["LLM_USER_PATH"] = saved
    return root / "out"


@pytest.fixture
def user(llm_user, monkeypatch) -> Path:
    monkeypatch.delenv(prompt_cache.DISK_ENV, raising=False)
    session.unload()
    prompt_cache.MEMORY.clear()
    yield llm_user
    session.unload()
    prompt_cache.MEMORY.clear()


@pytest.fixture
def copy(prepared, tmp_path, user) -> Path:
    path = tmp_path / "copy"
    shutil.copytree(prepared, path)
    registry.register(NAME, path)
    return path


@pytest.fixture(scope="module")
def intact_answer(prepared, tmp_path_factory):
    """The tiny model's greedy answer to "hello there" while undamaged (computed once, in a user directory of
    its own): damaged weights must never give it as if nothing were wrong, nor anything else."""
    saved = os.environ.get("LLM_USER_PATH")
    os.environ["LLM_USER_PATH"] = str(tmp_path_factory.mktemp("dmg-answer"))
    try:
        registry.register(NAME, prepared)
        result = run("-m", MODEL, "hello there", *GREEDY, "-n")
    finally:
        os.environ["LLM_USER_PATH"] = saved
        session.unload()
        prompt_cache.MEMORY.clear()
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def answer(copy, intact_answer):
    return intact_answer


# ------------------------------------------------------------------------------ 1. the four data-loss cases


def test_prepare_refuses_an_output_holding_someone_elses_manifest_and_remove_keeps_it(user, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text('{"name":"app"}')
    (site / "important.txt").write_text("keep")
    before = tree(site)
    line = one_line_error(run("flash-moe", "prepare", "--demo", "--output", str(site)))
    assert "is not empty and is not a flash-moe model" in line
    line = one_line_error(run("flash-moe", "remove", "demo", "--yes"))
    assert "no prepared model named 'demo'" in line
    assert tree(site) == before


def test_remove_deletes_only_what_prepare_wrote(copy, user):
    (copy / "notes.txt").write_text("mine")
    before = {p.name for p in copy.iterdir()}
    assert OWNER_MARKER in before
    result = run("flash-moe", "remove", NAME, "--yes")
    assert result.exit_code == 0, result.output
    assert "kept what it did not write" in result.output and "notes.txt" in result.output
    assert [p.name for p in copy.iterdir()] == ["notes.txt"] and (copy / "notes.txt").read_text() == "mine"


def test_remove_refuses_a_registered_directory_that_is_not_ours(user, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / MANIFEST_NAME).write_text('{"name": "app"}')
    (mine / "data.txt").write_text("keep")
    registry.register("victim", mine)
    before = tree(mine)
    line = one_line_error(run("flash-moe", "remove", "victim", "--yes"))
    assert "was not made by `llm flash-moe prepare`" in line and "nothing deleted" in line
    assert tree(mine) == before


def _disk_full_on_save(monkeypatch):
    """MLX's own error for a full disk while the snapshot's file is half written (what `save_safetensors`
    raises: a RuntimeError, not an OSError)."""
    import mlx_lm.models.cache as cache_module

    def save_prompt_cache(path, caches, metadata):
        Path(path).write_bytes(b"\0" * 100)  # the part written before the disk filled up
        raise RuntimeError("[write] Unable to write 9619 bytes to file.")

    monkeypatch.setattr(cache_module, "save_prompt_cache", save_prompt_cache)


def test_a_full_disk_under_the_prompt_cache_never_fails_the_answer(copy, user, answer, monkeypatch):
    _disk_full_on_save(monkeypatch)
    result = run("-m", MODEL, "hello there", *GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == answer
    assert "Warning: could not save the prompt cache" in result.stderr and "Traceback" not in result.output
    assert len(logged_turns(user)) == 1
    snapshots = user / "flash-moe" / "prompt-cache" / NAME
    assert not list(snapshots.glob(".tmp-*")) and not list(snapshots.glob("*.safetensors"))


def test_a_real_full_disk_under_the_prompt_cache_never_fails_the_answer(copy, user, answer):
    snapshots = user / "flash-moe" / "prompt-cache"
    snapshots.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(snapshots)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?); the injected variant covers it")
    try:
        result = run("-m", MODEL, "hello there", *GREEDY)
        assert result.exit_code == 0, result.output
        assert result.stdout == answer and "Traceback" not in result.output
        assert len(logged_turns(user)) == 1
        assert not list(snapshots.rglob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(snapshots)], check=False)


@pytest.mark.parametrize("content", ["{garbage", '{"models": {"dmg": 5}}', '{"models": [1]}', "[]",
                                     '{"models": {"../x": "/tmp"}}', "[" * 200_000 + "]" * 200_000])
def test_a_damaged_models_json_never_crashes_llm_nor_orphans_models(copy, user, source, tmp_path, content):
    registry.register("other", copy)  # a second model, in a place only models.json knows
    path = user / "flash-moe" / "models.json"
    path.write_text(content)
    result = run("models")  # every llm command, other plugins' models included
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "Warning: llm-flash-moe:" in result.stderr and "models.json is damaged" in result.stderr
    line = one_line_error(run("flash-moe", "models"))
    assert "models.json is damaged" in line
    assert path.read_text() == content  # reading never rewrites it
    # the next prepare must rewrite it: the damaged copy is kept aside, and it says so
    result = run("flash-moe", "prepare", str(source), "--name", "fresh", "--output", str(tmp_path / "fresh"))
    assert result.exit_code == 0, result.output
    assert "was damaged: kept it as" in result.stderr
    (aside,) = path.parent.glob("models.json.damaged-*")
    assert aside.read_text() == content
    assert "fresh" in registry.prepared()


def test_a_damaged_models_json_recovers_models_in_the_default_place(user, prepared):
    shutil.copytree(prepared, registry.default_output(NAME))
    (user / "flash-moe" / "models.json").write_text("{garbage")
    registry.register("x", registry.default_output(NAME))  # any command that must rewrite it
    assert set(registry.prepared()) == {NAME, "x"}


@pytest.mark.parametrize("name", ["prompt-cache", "cluster", "bench", "models.json", "threads.json"])
def test_reserved_names_are_refused(user, source, name):
    line = one_line_error(run("flash-moe", "prepare", str(source), "--name", name))
    assert f"model name {name!r} is reserved" in line or "must use lowercase" in line
    assert not (user / "flash-moe" / name / OWNER_MARKER).exists()


def test_removing_a_model_never_touches_another_models_snapshots(copy, user):
    assert run("-m", MODEL, "hello there", *GREEDY).exit_code == 0
    snapshots = user / "flash-moe" / "prompt-cache" / NAME
    kept = tree(snapshots)
    assert kept
    line = one_line_error(run("flash-moe", "remove", "prompt-cache", "--yes"))
    assert "no prepared model named 'prompt-cache'" in line
    assert tree(snapshots) == kept


# ------------------------------------------------------------------------------ 2. the matrix: every file damaged


def _outcome(result, answer) -> str:
    """What a prompt on a damaged model did: "refused" (one line, nothing printed), "same" (the intact
    model's answer: the damage did not reach the weights used), or a failure of the test."""
    if result.exit_code == 0:
        assert result.stdout == answer, f"an answer from damaged weights: {result.stdout!r} != {answer!r}"
        return "same"
    one_line_error(result)
    assert result.stdout == "", result.stdout
    return "refused"


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _empty(path: Path):
    path.write_bytes(b"")


def _link_to_dev_zero(path: Path):
    path.unlink()
    path.symlink_to("/dev/zero")


def _link_elsewhere(path: Path):
    """A link to a file of the user's (of the same size and other bytes): never read as ours, never written."""
    model = path.parent.parent if path.parent.name == "experts" else path.parent
    other = model.parent / f"users-{path.name}"
    data = bytearray(path.read_bytes())
    data[:1] = bytes([data[0] ^ 0xFF]) if data else b"x"
    other.write_bytes(bytes(data))
    path.unlink()
    path.symlink_to(other)


def _delete(path: Path):
    path.unlink()


DAMAGES = [_truncate, _flip, _empty, _link_to_dev_zero, _link_elsewhere, _delete]
REPAIRED = (_flip, _link_elsewhere)  # every file, repaired and compared (a prepare each: slow)


def verify_error(result) -> str:
    """`verify`'s report: a line per damage, then one ``Error:`` line with the repair command; no traceback."""
    out = result.output.strip()
    assert result.exit_code == 1 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith(PROGRESS_BARS)]
    assert lines[-1].startswith("Error: ") and not any(line.startswith("Error: ") for line in lines[:-1]), out
    return lines[-1]
MODEL_FILES = ["manifest.json", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "generation_config.json", "model.safetensors", "experts/layer-000.bin", "experts/layer-003.bin"]
TALLY = {"tried": 0, "refused": 0, "same": 0, "verify_named": 0, "repaired": 0}


@pytest.fixture(scope="module", autouse=True)
def tally():
    yield TALLY
    print(f"\ndamage matrix: {TALLY}")


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("file", MODEL_FILES)
def test_every_file_damaged_is_refused_named_by_verify_and_repaired(copy, prepared, source, answer, monkeypatch,
                                                                   file, damage):
    """Each damage: the prompt is refused in one line (or answers exactly as before: the damage did not
    reach what it used), `verify` names it, and `prepare --repair` (or, for a damaged manifest, the same
    prepare again) makes the model byte-identical to the intact one; nothing outside the model is written."""
    from llm_flash_moe.bank.bank_pool import CHECK_READS_ENV

    monkeypatch.setenv(CHECK_READS_ENV, "1")  # a flipped expert byte is caught on read (docs/RELIABILITY.md)
    damage(copy / file)
    outside = {p: p.read_bytes() for p in copy.parent.iterdir() if p.is_file()}
    TALLY["tried"] += 1
    TALLY[_outcome(run("-m", MODEL, "hello there", *GREEDY, "-n"), answer)] += 1
    session.unload()
    verified = run("flash-moe", "verify", NAME)
    if file == "manifest.json":  # no checksums left to trust: the message says to prepare it again
        assert "manifest.json" in one_line_error(verified) and "prepare" in one_line_error(verified)
    else:
        line = verify_error(verified)
        assert "is damaged" in line and "--repair" in line, verified.output
        layer = f"layer {int(file[-7:-4])}" if file.startswith("experts/") else file
        assert layer in verified.output, verified.output
    TALLY["verify_named"] += 1
    if damage not in REPAIRED:
        return
    repaired = run("flash-moe", "prepare", str(source), "--name", NAME, "--output", str(copy), "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "Traceback" not in repaired.output
    assert tree(copy) == tree(prepared) and not any(p.is_symlink() for p in copy.rglob("*"))
    assert run("flash-moe", "verify", NAME).exit_code == 0
    assert {p: p.read_bytes() for p in copy.parent.iterdir() if p.is_file()} == outside
    TALLY["repaired"] += 1


# ------------------------------------------------------------------------------ 3. the matrix: every manifest field


def _leaves(value, path=()):
    """Paths of a manifest's fields: every one of the first layer (its record layout included), the number
    and file of the others, the first of each list of checksums or files, every config field."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _leaves(sub, path + (key,))
    elif isinstance(value, list) and value and isinstance(value[0], (dict, str)) and path[-1:] != ("shape",):
        for i, sub in enumerate(value):
            if path == ("expert_layers",) and i > 0:
                yield path + (i, "layer")
                yield path + (i, "file")
            elif i == 0 or (path != ("files",) and path[-1:] != ("checksums",)):
                yield from _leaves(sub, path + (i,))
    else:
        yield path


def _mutations(value):
    """What a damaged or hostile manifest may hold instead of ``value``."""
    if isinstance(value, bool) or value is None:
        return {"other type": "x", "deleted": KeyError}
    if isinstance(value, int):
        return {"deleted": KeyError, "other type": str(value), "huge": 10 ** 12, "negative": -1, "nudged": value + 64}
    if isinstance(value, str):
        return {"deleted": KeyError, "other type": 7, "nudged": value + "x"}
    if isinstance(value, list):
        return {"deleted": KeyError, "other type": {"a": 1}, "nudged": value + [1] if value else [1],
                "huge": [10 ** 9] * len(value)}
    return {"deleted": KeyError, "other type": 7}


def _set(data, path, value):
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        if isinstance(target, list):
            target.pop(path[-1])
        else:
            del target[path[-1]]
    else:
        target[path[-1]] = value


def _cases(manifest: dict, config: bool):
    for path in _leaves(manifest):
        if (path[0] == "config") != config:
            continue
        value = manifest
        for key in path:
            value = value[key]
        if path[0] == "resident_quantization" and len(path) > 2 and ".layers.0." not in path[1]:
            continue  # the other layers' entries are alike
        for kind, new in _mutations(value).items():
            if config and kind != "other type":
                continue
            yield path, kind, new
        if path[-1] == "file":
            yield path, "a path", "../../etc/passwd"
    if not config:  # two layers on one file; two entries of one layer; a layer's records overlapping another's
        layers = manifest["expert_layers"]
        yield ("expert_layers", 1, "file"), "shared file", layers[0]["file"]
        yield ("expert_layers", 1, "layer"), "listed twice", layers[0]["layer"]
        yield ("expert_layers", 0, "layout", "parts", 1, "offset"), "overlapping parts", 0
        yield ("expert_layers",), "a billion experts", [{**layers[0], "num_experts": 10 ** 9}]


@pytest.mark.parametrize("config", [False, True], ids=["fields", "config"])
def test_every_manifest_field_damaged_is_refused_or_harmless(copy, answer, config):
    """Each field deleted, of another type, huge, negative or nudged (offsets by 64 bytes): `llm -m` refuses
    in one line or answers exactly as the intact model does; `info`, `verify` and `models` never show a
    traceback; none allocates what the manifest claims (a billion experts is refused before anything)."""
    original = (copy / MANIFEST_NAME).read_text()
    manifest = json.loads(original)
    counts = {"tried": 0, "refused": 0, "same": 0}
    for path, kind, new in _cases(manifest, config):
        data = json.loads(original)
        try:
            _set(data, path, new)
        except (KeyError, IndexError, TypeError):
            continue
        (copy / MANIFEST_NAME).write_text(json.dumps(data))
        session.unload()
        result = run("-m", MODEL, "hello there", *GREEDY, "-n")
        try:
            outcome = _outcome(result, answer)
            commands = [["flash-moe", "info", NAME]] + ([["flash-moe", "verify", NAME], ["flash-moe", "models"]]
                                                        if outcome == "refused" else [])
            for command in commands:  # the commands that read a manifest (a damaged one showed tracebacks)
                other = run(*command)
                assert "Traceback" not in other.output and other.exit_code in (0, 1), other.output
        except AssertionError as e:
            raise AssertionError(f"manifest {'/'.join(map(str, path))} {kind}: {e}") from None
        counts["tried"] += 1
        counts[outcome] += 1
    (copy / MANIFEST_NAME).write_text(original)
    print(f"\nmanifest matrix ({'config' if config else 'fields'}): {counts}")
    TALLY[f"manifest_{'config' if config else 'fields'}"] = counts
    assert counts["tried"] > (60 if config else 120)


# ------------------------------------------------------------------------------ 4. prompt-cache snapshots


def _snapshot_flip(path: Path):
    _flip(path)


def _snapshot_truncate(path: Path):
    _truncate(path)


def _snapshot_kv_offset(path: Path):
    """The KV caches' offset (a scalar in the file) one token short: the silent-garbage case of the attack run."""
    import mlx.core as mx

    arrays, metadata = mx.load(str(path), return_metadata=True)
    count = int(path.name.split("-")[0])
    changed = {k: (mx.array(count - 1) if v.ndim == 0 and v.item() == count else v) for k, v in arrays.items()}
    assert any(changed[k] is not arrays[k] for k in arrays)
    mx.save_safetensors(str(path), changed, metadata)


@pytest.mark.parametrize("damage", [_snapshot_flip, _snapshot_truncate, _snapshot_kv_offset],
                         ids=lambda f: f.__name__[len("_snapshot_"):])
def test_a_damaged_prompt_cache_snapshot_is_dropped_with_a_warning(copy, user, damage):
    assert run("-m", MODEL, "hello there", *GREEDY).exit_code == 0
    snapshots = user / "flash-moe" / "prompt-cache" / NAME
    saved = {p.name: p.read_bytes() for p in snapshots.glob("*.safetensors")}
    assert saved

    def follow_up(snapshot_damage=None):
        """The next turn in a new process's state, from the snapshots of the first turn (damaged or not)."""
        session.unload()
        prompt_cache.MEMORY.clear()
        for p in snapshots.glob("*.safetensors"):
            p.unlink()
        for name, data in saved.items():
            (snapshots / name).write_bytes(data)
            if snapshot_damage is not None:
                snapshot_damage(snapshots / name)
        return run("-c", "-n", "and more", *GREEDY)

    intact = follow_up()
    assert intact.exit_code == 0 and "Warning" not in intact.stderr, intact.output
    result = follow_up(damage)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert result.stdout == intact.stdout
    assert "Warning: dropped a damaged prompt-cache snapshot" in result.stderr
    assert not any((snapshots / name).exists() and (snapshots / name).read_bytes() == data
                   for name, data in saved.items())  # the intact bytes were never restored: all were dropped


# ------------------------------------------------------------------------------ 5. hostile sources and schemas


def _rewrite_header(path: Path, change):
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header = change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _header_a_list(d):
    _rewrite_header(d / "model.safetensors", lambda h: [1, 2])
    return "its header is not a JSON object"


def _first_tensor_field(d, field, value):
    """The first tensor's ``field`` in the header set to ``value`` (deleted when KeyError)."""
    def change(h):
        _set(h, (_first_tensor(h), field), value)
        return h
    _rewrite_header(d / "model.safetensors", change)


def _negative_offset(d):
    _first_tensor_field(d, "data_offsets", [-8, 8])
    return "no valid data_offsets"


def _string_offsets(d):
    _first_tensor_field(d, "data_offsets", ["0", "8"])
    return "no valid data_offsets"


def _inflated_shape(d):
    _first_tensor_field(d, "shape", [10 ** 9, 10 ** 9])
    return "not the 1,000,000,000,000,000,000 elements of its shape"


def _missing_shape(d):
    _first_tensor_field(d, "shape", KeyError)
    return "no valid shape"


def _overlapping_tensors(d):
    def change(h):
        keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = keys[0], keys[1]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
        return h
    _rewrite_header(d / "model.safetensors", change)
    return "overlap"


def _config_nested_deep(d):
    (d / "config.json").write_text('{"a":' + "[" * 200_000 + "]" * 200_000 + "}")
    return "nested too deeply"


def _a_million_layers(d):
    config = json.loads((d / "config.json").read_text())
    (config.get("text_config") or config)["num_hidden_layers"] = 1_000_000
    (d / "config.json").write_text(json.dumps(config))
    return "num_hidden_layers is 1,000,000, outside 1 to 1,024"


def _no_experts(d):
    config = json.loads((d / "config.json").read_text())
    (config.get("text_config") or config)["num_experts"] = 0
    (d / "config.json").write_text(json.dumps(config))
    return "num_experts is 0, outside 1 to 16,384"


def _config_is_dev_zero(d):
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")
    return "config.json links outside the checkpoint (to /dev/zero)"


def _template_is_dev_urandom(d):
    (d / "chat_template.jinja").unlink(missing_ok=True)
    (d / "chat_template.jinja").symlink_to("/dev/urandom")
    return "chat_template.jinja links outside the checkpoint (to /dev/urandom)"


def _tokenizer_links_outside(d):
    outside = d.parent / "secret.txt"
    outside.write_text("not for the model")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(outside)
    return "tokenizer.json links outside the checkpoint"


def _shard_is_a_fifo(d):
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    return "is not a regular file"


HOSTILE_SOURCES = [_header_a_list, _negative_offset, _string_offsets, _inflated_shape, _missing_shape,
                   _overlapping_tensors, _config_nested_deep, _a_million_layers, _no_experts, _config_is_dev_zero,
                   _template_is_dev_urandom, _tokenizer_links_outside, _shard_is_a_fifo]


@pytest.mark.parametrize("case", HOSTILE_SOURCES, ids=lambda f: f.__name__.strip("_"))
def test_hostile_sources_are_refused_in_one_line(source, user, tmp_path, case):
    d = tmp_path / "source"
    shutil.copytree(source, d)
    expected = case(d)
    before = {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
              for p in d.iterdir()}
    line = one_line_error(run("flash-moe", "prepare", str(d), "--name", "bad", "--output", str(tmp_path / "out")))
    assert expected in line, line
    assert not (tmp_path / "out").exists() and "bad" not in registry.registered()
    assert {p.name: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in d.iterdir()} == before


def _ref_chain(n: int) -> dict:
    defs = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$defs": defs, "type": "object", "properties": {"x": {"$ref": "#/$defs/a0"}}}


def _nested(n: int) -> dict:
    schema = {"type": "string"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("schema,expected", [
    (_ref_chain(5000), "has 5,001 $refs, more than 500"),
    (_nested(100), "nested more than 64 levels deep"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20_000)}}, "more than 20,000 parts"),
], ids=["ref-chain", "deep", "wide"])
def test_hostile_schemas_are_refused_before_llguidance_sees_them(copy, schema, expected):
    result = run("-m", MODEL, "hi", *GREEDY, "--schema", json.dumps(schema))
    line = one_line_error(result)
    assert expected in line and "simplify it" in line, line


def test_a_model_of_format_version_1_still_loads_and_verifies(copy, answer):
    """Models prepared before the manifest carried its files' checksums keep working as they are."""
    data = json.loads((copy / MANIFEST_NAME).read_text())
    del data["files"]
    data["format_version"] = data["settings"]["format_version"] = 1
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    result = run("-m", MODEL, "hello there", *GREEDY, "-n")
    assert result.exit_code == 0 and result.stdout == answer, result.output
    assert run("flash-moe", "verify", NAME).exit_code == 0
