"""The engine: one process per prepared model that keeps it loaded (resident weights, compiled kernels, the
expert bank, the in-memory prompt cache) for every llm command, and exits after ``keep_alive`` idle seconds.

It listens on a Unix socket (0600, peers of another uid refused) and runs the requests one at a time on one
generation thread, in the order they came; a request waiting for its turn is told so. Each request runs
the plugin's own in-process path (``plugin._FlashMoe._events``), so everything it does (options, the
prompt cache, tools, ``--schema``, reasoning) is the same code; its events, tool calls, usage and warnings
go back to the client, which writes logs.db. A client that disconnects stops its generation at the next
token. ``python -m llm_flash_moe.service.server NAME`` is what ``client.start`` runs, detached;
``llm flash-moe serve NAME`` runs it in the foreground (``--http``: with the OpenAI-compatible endpoint).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

from ..errors import FlashMoeError, one_line
from . import client, protocol

IDLE_CHECK_SECONDS = 0.5
STOP_WAIT_SECONDS = 10.0


@dataclass
class Job:
    """One generate request: ``send`` takes the protocol messages; ``stop`` set: end it at the next token."""

    request: dict
    send: Callable[[dict], None]
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Recorder:
    """Stands in for llm's Response in the engine: what the plugin records on it goes to the client."""

    def __init__(self, send: Callable[[dict], None]):
        self.send = send
        self.response_json: dict = {}
        self.usage = {"input": 0, "output": 0}

    def add_tool_call(self, call) -> None:
        self.send({"type": "tool_call", "name": call.name, "arguments": call.arguments,
                   "tool_call_id": call.tool_call_id})

    def set_usage(self, input=None, output=None, details=None) -> None:  # noqa: A002 - llm's names
        self.usage = {"input": input or 0, "output": output or 0}


class StderrTee:
    """The engine's stderr (its log), and, for text the generation thread writes (warnings), the client."""

    def __init__(self, stream):
        self.stream = stream
        self.forward: Optional[Callable[[dict], None]] = None
        self.thread: Optional[int] = None

    def write(self, text: str) -> int:
        if self.forward is not None and threading.get_ident() == self.thread and text:
            self.forward({"type": "warning", "text": text})
        return self.stream.write(text)

    def swap_stream(self, stream):  # a cluster moves the log to another fd: ring.divert_native_stderr
        old, self.stream = self.stream, stream
        return old

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Engine:
    """The engine of one prepared model. ``keep_alive``: idle seconds before it exits (None: never)."""

    def __init__(self, name: str, keep_alive: Optional[float]):
        from .. import registry
        from ..plugin.models import FlashMoeModel

        client.INSIDE_ENGINE = True
        self.name = name
        self.model = FlashMoeModel(name)
        self.model_dir = registry.model_dir(name)
        self.identity = protocol.engine_identity(name, self.model_dir)
        self.cluster = bool(self.identity.rpartition("|cluster:")[2])  # a cluster runs: this engine leads it
        self.keep_alive = keep_alive
        self.socket_path = protocol.socket_path(name)
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.current: Optional[Job] = None
        self.lock = threading.Lock()
        self.last_active = time.monotonic()
        self.started = time.time()
        self.served = 0
        self.connections = 0  # open connections: an engine never exits idle under a client that just connected
        self.stopping = threading.Event()
        self.listener: Optional[socket.socket] = None
        self._inode = None

    # -------------------------------------------------------------- generation

    def submit(self, request: dict, send: Callable[[dict], None], stop: Optional[threading.Event] = None) -> Job:
        """Queue a generate request; the client hears how many requests are ahead of it when it must wait."""
        job = Job(request, send, stop or threading.Event())
        with self.lock:
            ahead = self.jobs.qsize() + (1 if self.current is not None else 0)
            self.jobs.put(job)
        if ahead:
            job.send({"type": "waiting", "ahead": ahead})
        return job

    def generation_loop(self) -> None:
        tee = sys.stderr if isinstance(sys.stderr, StderrTee) else None
        if tee is not None:
            tee.thread = threading.get_ident()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.current = job
            try:
                if not job.stop.is_set():
                    if tee is not None:
                        tee.forward = job.send
                    self.run(job)
            finally:
                if tee is not None:
                    tee.forward = None
                with self.lock:
                    self.current = None
                    self.served += 1
                    self.last_active = time.monotonic()
                job.done.set()

    def run(self, job: Job) -> None:
        """One response, through the plugin's in-process path."""
        import llm

        from ..plugin.images import messages_from_wire

        request = job.request
        if request.get("keep_alive") is not None and self.keep_alive is not None:
            self.keep_alive = request["keep_alive"]  # the latest command's choice, as ollama does
        prompt = SimpleNamespace(
            messages=messages_from_wire(request.get("messages") or []),
            tools=[llm.Tool(name=t["name"], description=t.get("description"), input_schema=t.get("input_schema") or {})
                   for t in request.get("tools") or []],
            schema=request.get("schema"), options=self.model.Options(**(request.get("options") or {})))
        conversation = SimpleNamespace(id=request["conversation_id"]) if request.get("conversation_id") else None
        recorder = Recorder(job.send)
        error = None
        try:
            for event in self.model._events(prompt, recorder, conversation, stop=job.stop):
                job.send(protocol.event_message(event))
                if job.stop.is_set():
                    break
        except (llm.ModelError, FlashMoeError) as e:
            error = str(e)
        except Exception as e:  # a defect: the traceback goes to the log, one line to the user
            traceback.print_exc()
            error = f"{one_line(e)} (the engine's log: {protocol.log_path(self.name)})"
        stopped = job.stop.is_set()
        if self.cluster_lost():  # set before the answer ends: the next command's hello hears "ending"
            self.stopping.set()
        job.send({"type": "usage", **recorder.usage, "response_json": recorder.response_json})
        job.send({"type": "error", "message": error} if error else {"type": "done"})
        if self.stopping.is_set():  # after the answer: what this thread writes goes to the client until then
            print("exiting: this engine cannot lead its cluster (MLX forms one group per process)", file=sys.stderr)
        if stopped:
            print(f"stopped a generation: its client went away ({recorder.usage['output']} tokens)", file=sys.stderr)

    # -------------------------------------------------------------- the socket

    def bind(self) -> None:
        """Listen on the model's socket; a socket left by a dead engine is replaced, a live engine is not."""
        path = self.socket_path
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise FlashMoeError(f"an engine of {self.name} already runs ({path}); "
                                    f"`llm flash-moe stop {self.name}` ends it")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        listener.listen(16)
        listener.settimeout(IDLE_CHECK_SECONDS)
        self.listener, self._inode = listener, path.stat().st_ino
        protocol.write_state(self.name, {"pid": os.getpid(), "model": self.name, "socket": str(path),
                                         "log": str(protocol.log_path(self.name)), "build": protocol.build_id(),
                                         "started": self.started})

    def serve(self) -> None:
        """Accept connections until stopped, idle for ``keep_alive`` seconds, or the model is gone."""
        generator = threading.Thread(target=self.generation_loop, name="flash-moe-generation", daemon=True)
        generator.start()
        print(f"flash-moe engine for {self.name}: pid {os.getpid()}, socket {self.socket_path}, keep_alive "
              f"{self.keep_alive if self.keep_alive is not None else 'forever'}", file=sys.stderr, flush=True)
        checked = 0.0
        try:
            while not self.stopping.is_set():
                try:
                    conn, _ = self.listener.accept()
                except socket.timeout:
                    conn = None
                if conn is not None:
                    conn.settimeout(None)
                    with self.lock:
                        self.connections += 1
                    threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
                if time.monotonic() - checked > 2:
                    checked = time.monotonic()
                    if self.stale():
                        print(f"{self.name} was prepared again, removed, or its cluster changed: exiting", file=sys.stderr)
                        break
                if self.idle_for() > (self.keep_alive if self.keep_alive is not None else float("inf")):
                    print(f"idle for {self.keep_alive} s: exiting", file=sys.stderr)
                    break
        finally:
            self.shutdown(generator)

    def idle_for(self, asking: int = 0) -> float:
        """Seconds since the last request ended; 0 while one runs or waits, or a client is connected
        (``asking``: connections not to count, e.g. the status request's own)."""
        with self.lock:
            if self.current is not None or self.jobs.qsize() or self.connections > asking:
                return 0.0
            return time.monotonic() - self.last_active

    def stale(self) -> bool:
        return protocol.engine_identity(self.name, self.model_dir) != self.identity

    def cluster_lost(self) -> bool:
        """A cluster runs and this engine does not lead it (lost or never joined its ranks): it ends now."""
        from ..cluster import leader
        from ..engine.session import loaded

        return self.cluster and (leader.broken() is not None or
                                 (loaded(self.model_dir) is not None and leader.active() is None))

    def shutdown(self, generator: threading.Thread) -> None:
        self.stopping.set()
        if self.listener is not None:
            self.listener.close()
        try:
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        state = protocol.read_state(self.name)
        if state is not None and state.get("pid") == os.getpid():
            protocol.state_path(self.name).unlink(missing_ok=True)
        with self.lock:
            if self.current is not None:
                self.current.stop.set()
            while True:
                try:
                    pending = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if pending is not None:
                    pending.send({"type": "error", "message": f"the {self.name}-flash engine was stopped"})
                    pending.done.set()
            self.jobs.put(None)
        generator.join(STOP_WAIT_SECONDS)

    def handle(self, sock: socket.socket) -> None:
        """One connection: hello, then one request."""
        channel = protocol.Channel(sock)
        try:
            if not protocol.same_user(sock):
                return
            first = channel.receive()
            if first is None or first.get("type") != "hello":
                return
            channel.send({"type": "hello", "protocol": protocol.PROTOCOL, "build": protocol.build_id(),
                          "model": self.identity, "pid": os.getpid(), "ending": self.stopping.is_set()})
            request = channel.receive()
            kind = (request or {}).get("type")
            if kind == "generate":
                self.generate(request, channel)
            elif kind == "status":
                channel.send(self.status())
            elif kind == "stop":
                print("ending: `llm flash-moe stop`", file=sys.stderr, flush=True)
                channel.send({"type": "done"})
                self.stopping.set()
        except ConnectionError:
            pass
        finally:
            channel.close()
            with self.lock:
                self.connections -= 1

    def generate(self, request: dict, channel: protocol.Channel) -> None:
        stop = threading.Event()

        def send(message: dict) -> None:
            if stop.is_set():
                return
            try:
                channel.send(message)
            except ConnectionError:
                stop.set()

        job = self.submit(request, send, stop)
        for message in channel:  # until the client closes (after "done", or Ctrl-C) or cancels
            if message.get("type") == "cancel":
                break
        job.stop.set()
        job.done.wait()

    def status(self) -> dict:
        from ..cluster import leader
        from ..engine.session import loaded

        flash = loaded(self.model_dir)
        leading = leader.active()
        with self.lock:
            busy, waiting = self.current is not None, self.jobs.qsize()
        return {"type": "status", "pid": os.getpid(), "model": self.name, "build": protocol.build_id(),
                "socket": str(self.socket_path), "log": str(protocol.log_path(self.name)),
                "keep_alive": self.keep_alive, "idle_seconds": round(self.idle_for(asking=1), 1), "busy": busy,
                "waiting": waiting, "served": self.served, "started": self.started,
                "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes(),
                "loaded": flash is not None, "bank_bytes": flash.bank.nbytes if flash else 0,
                "bytes_read": flash.bank.stats.bytes_read if flash else 0,
                "ranks": leading.cluster.size if leading is not None else None}


def rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def run_engine(name: str, keep_alive: Optional[float], http: Optional[str] = None) -> None:
    """Run the engine of ``name`` in this process until it stops (SIGTERM / SIGINT: at once)."""
    sys.stderr = StderrTee(sys.stderr)
    engine = Engine(name, keep_alive)
    engine.bind()

    def stop(signum, frame):
        print(f"ending: {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        engine.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    if http is None:
        signal.signal(signal.SIGINT, stop)
        engine.serve()
        return
    from .http import serve_http

    threading.Thread(target=engine.serve, name="flash-moe-socket", daemon=True).start()
    serve_http(engine, http)  # uvicorn handles SIGINT / SIGTERM
    engine.stopping.set()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llm_flash_moe.service.server")
    parser.add_argument("name")
    parser.add_argument("--keep-alive", type=float, default=protocol.DEFAULT_KEEP_ALIVE)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        run_engine(args.name, args.keep_alive)
    except FlashMoeError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
