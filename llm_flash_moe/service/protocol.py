"""What the llm process and the engine say to each other, and where the engine's files are.

Messages are JSON objects, one per line (at most ``MAX_MESSAGE_BYTES``), over a Unix socket. The client
opens with ``hello`` (protocol, plugin build, the engine's identity: the model's manifest and the cluster it
leads); the engine answers ``hello`` (its own; ``ending`` when it is about to exit). Then one request:
``generate`` (the prompt: llm Messages as dicts, images inside them as base64, read by the llm process:
plugin/images.py; tools, schema, options, conversation id), answered by ``waiting`` / ``warning`` / ``event``
/ ``tool_call`` / ``usage`` and one ``done`` or ``error``; ``status``; or ``stop``. The client cancels a
generation by closing the socket (or ``cancel``).

Nothing here imports mlx or llm.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..errors import FlashMoeError

PROTOCOL = 1
KEEP_ALIVE_ENV = "LLM_FLASH_MOE_KEEP_ALIVE"
DEFAULT_KEEP_ALIVE = 300
SOCKET_PATH_MAX = 100  # AF_UNIX paths: 104 bytes on macOS, 108 on Linux, the final NUL included
MAX_MESSAGE_BYTES = 512 * 2**20  # one message: a prompt with up to 5 images of the largest size, as base64
_BUILD: Optional[str] = None


def keep_alive(option: Optional[int]) -> int:
    """Seconds an engine stays after its last request: ``-o keep_alive``, else $LLM_FLASH_MOE_KEEP_ALIVE,
    else 300. 0: no engine, the model runs in the llm process."""
    if option is not None:
        return option
    raw = os.environ.get(KEEP_ALIVE_ENV, "").strip()
    if not raw:
        return DEFAULT_KEEP_ALIVE
    try:
        value = int(float(raw))
    except ValueError:
        raise FlashMoeError(f"{KEEP_ALIVE_ENV}={raw!r} is not a number of seconds (0: no engine)") from None
    if value < 0:
        raise FlashMoeError(f"{KEEP_ALIVE_ENV}={raw!r} must be 0 or more seconds")
    return value


def build_id() -> str:
    """This plugin's build: its version and the size and time of every module file, so an engine started
    by other code (an upgrade, an edited checkout) is never used."""
    global _BUILD
    if _BUILD is None:
        from importlib import metadata

        try:
            version = metadata.version("llm-flash-moe")
        except metadata.PackageNotFoundError:
            version = "unknown"
        digest = hashlib.sha256(version.encode())
        package = Path(__file__).resolve().parent.parent
        for path in sorted(package.rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path.relative_to(package)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        _BUILD = f"{version}+{digest.hexdigest()[:12]}"
    return _BUILD


def model_identity(model_dir: Path) -> str:
    """The prepared model as an engine loaded it: its directory and its manifest's time (``prepare`` writes
    the manifest last, so a re-prepared model has a new one); "" when it is gone."""
    from ..flash_layout import MANIFEST_NAME

    try:
        return f"{Path(model_dir).resolve()}:{(Path(model_dir) / MANIFEST_NAME).stat().st_mtime_ns}"
    except OSError:
        return ""


def engine_identity(name: str, model_dir: Path) -> str:
    """What an engine must match to be used: the model (``model_identity``) and the cluster it leads (the
    cluster file of ``llm flash-moe worker`` while it runs), so that an engine started before a cluster
    appeared, changed or went away is replaced."""
    from ..cluster.ring import ClusterConfig

    model = model_identity(model_dir)
    return f"{model}|cluster:{ClusterConfig.identity(name)}" if model else ""


# ------------------------------------------------------------------------------ files


def engines_dir() -> Path:
    """The engines' state files, logs and (when the path is short enough) sockets: 0700."""
    from .. import registry

    return private_dir(registry.root() / "engines")


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    stat = path.stat()
    if stat.st_uid != os.getuid():
        raise FlashMoeError(f"{path} belongs to another user; remove it or set LLM_USER_PATH")
    if stat.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _file_stem(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def log_path(name: str) -> Path:
    return engines_dir() / f"{_file_stem(name)}.log"


def state_path(name: str) -> Path:
    return engines_dir() / f"{_file_stem(name)}.json"


def lock_path(name: str) -> Path:
    return engines_dir() / f"{_file_stem(name)}.lock"


def socket_path(name: str) -> Path:
    """The engine's socket: in the engines directory, or, when that path is too long for AF_UNIX (deep
    home or temporary directories), in a short per-user directory (``llm flash-moe ps`` shows where)."""
    path = engines_dir() / f"{_file_stem(name)}.sock"
    if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
        return path
    short = private_dir(Path(tempfile.gettempdir()) / f"llm-flash-moe-{os.getuid()}")
    key = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    path = short / f"{key}.sock"
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        path = private_dir(Path("/tmp") / f"llm-flash-moe-{os.getuid()}") / f"{key}.sock"
    return path


def read_state(name: str) -> Optional[dict]:
    try:
        state = json.loads(state_path(name).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(name: str, state: dict) -> None:
    path = state_path(name)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------ the wire


class Channel:
    """One connection: ``send(message)`` and iterating over the messages received (until the other side
    closes). A send to a peer that is gone raises ``ConnectionError``."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._reader = sock.makefile("rb")

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode() + b"\n"
        if len(data) > MAX_MESSAGE_BYTES:
            raise FlashMoeError(f"this request is {len(data) / 1e6:.0f} MB with its images, more than the "
                                f"{MAX_MESSAGE_BYTES / 2**20:.0f} MiB one request to the engine may be; attach fewer "
                                "or smaller images, or run it in this process: -o keep_alive 0")
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ConnectionError(str(e)) from None

    def receive(self) -> Optional[dict]:
        """The next message, or None when the other side closed the connection (or sent more than a message
        may be: the connection is then dropped)."""
        try:
            line = self._reader.readline(MAX_MESSAGE_BYTES + 1)
        except OSError:
            return None
        if not line or not line.endswith(b"\n") and len(line) > MAX_MESSAGE_BYTES:
            return None
        try:
            message = json.loads(line)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def __iter__(self) -> Iterator[dict]:
        while True:
            message = self.receive()
            if message is None:
                return
            yield message

    def close(self) -> None:
        for close in (self._reader.close, self.sock.close):
            try:
                close()
            except OSError:
                pass


def peer(sock: socket.socket):
    """(pid or None, uid) of the process at the other end of a Unix socket."""
    if sys.platform.startswith("linux"):
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        return pid, uid
    # macOS / BSD: getpeereid(3) is LOCAL_PEERCRED's xucred (version, uid, ...) at level SOL_LOCAL (0).
    _, uid = struct.unpack_from("Ii", sock.getsockopt(0, 0x001, 76))
    return None, uid


def same_user(sock: socket.socket) -> bool:
    try:
        return peer(sock)[1] == os.getuid()
    except OSError:
        return False


# ------------------------------------------------------------------------------ prompts as messages


def prompt_request(name: str, prompt, messages: list, conversation_id: Optional[str], keep_alive_seconds: int) -> dict:
    """An llm Prompt as a ``generate`` request (``messages``: its messages as ``images.wire_messages`` carries
    them; the engine rebuilds them with ``images.messages_from_wire``)."""
    options = {k: v for k, v in prompt.options.model_dump().items() if v is not None and k != "keep_alive"}
    tools = [{"name": t.name, "description": t.description, "input_schema": t.input_schema}
             for t in (prompt.tools or [])]
    return {"type": "generate", "model": name, "messages": messages,
            "tools": tools, "schema": prompt.schema, "options": options, "conversation_id": conversation_id,
            "keep_alive": keep_alive_seconds}


def event_message(event) -> dict:
    """An llm StreamEvent (or plain text) as an ``event`` message."""
    if isinstance(event, str):
        return {"type": "event", "kind": "text", "chunk": event}
    return {"type": "event", "kind": event.type, "chunk": event.chunk, "tool_call_id": event.tool_call_id}
