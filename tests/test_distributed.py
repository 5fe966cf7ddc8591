"""Expert parallelism: two local ranks over MLX's ring backend on loopback (CPU), through the llm CLI.

Rank 1 (and the rank-0 cluster file) come from ``llm flash-moe worker tiny`` started exactly as
``mlx.launch`` starts it (MLX_RANK and MLX_HOSTFILE set by hand: the launcher's forwarding loop spins a
core per rank, which this 2-core machine cannot spare; one test runs the real launcher). Rank 0 is an
``llm`` process: the real CLI in a subprocess, with a recorder around ``mlx_lm.stream_generate`` and
``mx.distributed.all_sum`` that writes the generated token ids, the all_sum count and every rank's
counters to a JSON file. The reference is the same CLI command in one process, prompt cache off.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import logged_turns, running
from llm_flash_moe.cluster import distributed, ring
from llm_flash_moe import registry
from llm_flash_moe.measure.distributed_bench import free_ports
from llm_flash_moe.errors import FlashMoeError
from llm_flash_moe.cluster.ownership import Ownership, read_counts, write_counts

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

MODEL = "tiny-flash"
GREEDY = ["-o", "temperature", "0"]
LAYERS = 4  # the tiny qwen3_5_moe: every layer has experts
FIRST, SECOND = "The quick brown fox", "and then what happened"

RECORDER = r'''
import atexit, json, os, sys
import mlx.core as mx
import mlx_lm

record = {"tokens": [], "all_sums": 0, "ranks": None, "bytes_read": None, "error": None}
real_generate, real_all_sum = mlx_lm.stream_generate, mx.distributed.all_sum

def stream_generate(*args, **kwargs):
    tokens = []
    record["tokens"].append(tokens)
    for response in real_generate(*args, **kwargs):
        tokens.append(response.token)
        yield response

def all_sum(*args, **kwargs):
    record["all_sums"] += 1
    return real_all_sum(*args, **kwargs)

mlx_lm.stream_generate, mx.distributed.all_sum = stream_generate, all_sum
import click
from llm.cli import cli
code = 0
try:
    cli.main(sys.argv[1:], prog_name="llm", standalone_mode=False)
except click.ClickException as e:
    e.show()
    code = e.exit_code
from llm_flash_moe.cluster import leader
from llm_flash_moe.engine import session
record["all_sums_before_stats"] = record["all_sums"]
if leader.active() is not None:
    record["ranks"] = leader.active().stats()
flash = next(iter(session._LOADED.values()), None)
record["bytes_read"] = None if flash is None else flash.bank.stats.bytes_read
with open(os.environ["RECORD"], "w") as f:
    json.dump(record, f)
sys.exit(code)
'''


# ------------------------------------------------------------------------------ helpers


def user_dir(path: Path, monkeypatch, models: dict) -> Path:
    """An llm user directory with ``models`` (name -> prepared directory) registered."""
    path.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("LLM_USER_PATH", str(path))
    for name, directory in models.items():
        registry.register(name, directory)
    return path


def clean_env(user: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_") and k != "LLM_RAISE_ERRORS"}
    env.update({"LLM_USER_PATH": str(user), "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}, **extra)
    return env


class LocalCluster:
    """``llm flash-moe worker NAME`` for ranks 0..N-1 on loopback, each with its own llm user directory
    (rank 0's is the one ``llm`` runs in)."""

    def __init__(self, users: list, name: str = "tiny", logs: Path = None, **env):
        self.users, self.name = users, name
        self.nodes = [[f"127.0.0.1:{p}"] for p in free_ports(len(users))]
        self.hostfile = users[0] / "ring.json"
        self.hostfile.write_text(json.dumps(self.nodes))
        self.logs = [(logs or users[0]) / f"rank{r}.log" for r in range(len(users))]
        self.procs = []
        for rank, user in enumerate(users):
            out = open(self.logs[rank], "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "llm", "flash-moe", "worker", name], stdout=out, stderr=subprocess.STDOUT,
                env=clean_env(user, MLX_RANK=str(rank), MLX_HOSTFILE=str(self.hostfile), **env)))
            out.close()
        self.file = users[0] / "flash-moe" / "cluster" / f"{name}.json"
        self.wait_for(self.file.exists)
        for rank in range(1, len(users)):
            self.wait_for(lambda: self.session_pid(rank) is not None)

    def wait_for(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for p, log in zip(self.procs, self.logs):
                assert p.poll() is None, f"a worker exited: {log.read_text()}"
            assert time.monotonic() < deadline, "the cluster did not start: " + " | ".join(
                log.read_text() for log in self.logs)
            time.sleep(0.1)

    def session_pid(self, rank: int):
        """The pid of rank ``rank``'s current session (the supervisor's child), or None."""
        parent = self.procs[rank].pid
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry)
        return None

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def leader_run(user: Path, tmp_path: Path, *args, timeout: float = 120, **env):
    """``llm ARGS`` as rank 0 (a fresh process); returns (completed process, record)."""
    out = tmp_path / f"record-{time.monotonic_ns()}.json"
    done = subprocess.run([sys.executable, "-c", RECORDER, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(user, RECORD=str(out), **env))
    record = json.loads(out.read_text()) if out.exists() else None
    return done, record


def reference(user: Path, monkeypatch, *args) -> list:
    """Token ids of ``llm ARGS`` in this process, alone (no cluster file in ``user``)."""
    import mlx_lm
    from llm.cli import cli

    calls = []
    real = mlx_lm.stream_generate

    def recording(*a, **kw):
        tokens = []
        calls.append(tokens)
        for response in real(*a, **kw):
            tokens.append(response.token)
            yield response

    monkeypatch.setenv("LLM_USER_PATH", str(user))
    monkeypatch.setattr(mlx_lm, "stream_generate", recording)
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    monkeypatch.setattr(mlx_lm, "stream_generate", real)
    assert result.exit_code == 0, result.output
    return calls[0]


def logged(user: Path) -> list:
    return [json.loads(r["response_json"]) for r in logged_turns(user)]


HOOKS = Path(__file__).parent / "engine_hooks"


def engine_run(user: Path, tmp_path: Path, *args, timeout: float = 120):
    """``llm ARGS`` through the keep-alive engine (a fresh llm process; the engine stays for the next one);
    returns (completed process, the engine's records of this command: pid, tokens, ranks led)."""
    record = tmp_path / "engine-record.jsonl"
    before = len(record.read_text().splitlines()) if record.exists() else 0
    done = subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(user, LLM_FLASH_MOE_KEEP_ALIVE="120", PYTHONPATH=str(HOOKS),
                                        LLM_FLASH_MOE_TEST_RECORD=str(record)))
    lines = record.read_text().splitlines()[before:] if record.exists() else []
    return done, [json.loads(line) for line in lines]


def engine_status(user: Path, monkeypatch):
    """The status of the tiny model's engine in ``user`` (None: no engine answers)."""
    from llm_flash_moe.service import client

    monkeypatch.setenv("LLM_USER_PATH", str(user))
    return client.request("tiny", {"type": "status"})


@pytest.fixture
def engines(dirs, monkeypatch):
    """Engines started in rank 0's user directory are stopped after the test."""
    yield
    from conftest import stop_engines

    monkeypatch.setenv("LLM_USER_PATH", str(dirs["rank0"]))
    stop_engines()


@pytest.fixture
def dirs(tmp_path, monkeypatch, tiny_model):
    """User directories: "single" (the reference), "rank0" (llm's, with the cluster file), "rank1"."""
    from llm_flash_moe.engine import prompt_cache, session

    prompt_cache.MEMORY.clear()
    session.unload()  # the reference starts from an empty expert bank, as a new llm process does
    out = {name: user_dir(tmp_path / name, monkeypatch, {"tiny": tiny_model}) for name in ("rank1", "single", "rank0")}
    yield out
    prompt_cache.MEMORY.clear()


@pytest.fixture
def cluster(dirs):
    c = LocalCluster([dirs["rank0"], dirs["rank1"]], logs=dirs["rank0"].parent)
    yield c
    c.stop()


# ------------------------------------------------------------------------------ the ownership map


def test_round_robin_and_balanced_maps(tmp_path):
    rr = Ownership.round_robin({0: 8, 3: 8}, 2)
    assert rr.owners[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert rr.owned(3, 1).tolist() == [False, True] * 4
    counts = {0: [100, 90, 10, 10, 5, 5, 1, 1]}
    path = tmp_path / "counts.json"
    write_counts(path, counts)
    balanced = Ownership.balanced({0: 8, 3: 8}, 2, read_counts(path))
    owner = balanced.owners[0]
    assert sorted(np.bincount(owner).tolist()) == [4, 4]  # equal shares of experts
    loads = [sum(c for c, o in zip(counts[0], owner) if o == r) for r in range(2)]
    assert abs(loads[0] - loads[1]) <= 10  # round-robin would give 116 vs 106; popularity 100 and 90 split
    assert owner[0] != owner[1]
    assert balanced.owners[3].tolist() == rr.owners[3].tolist()  # no counts for layer 3: round-robin
    assert balanced.digest() != rr.digest() and Ownership.from_json(balanced.to_json()).digest() == balanced.digest()
    table = balanced.table()
    assert Ownership.from_table(2, "balanced", [0, 3], table).digest() == balanced.digest()
    with pytest.raises(FlashMoeError, match="layer 0 have 3 entries"):
        Ownership.balanced({0: 8}, 2, {0: [1, 2, 3]})


def test_fingerprints_name_what_differs():
    nodes = [["10.0.0.1:1"], ["10.0.0.2:2"]]
    own = Ownership.round_robin({0: 8}, 2)
    base = {"protocol": 1, "ranks": 2, "model": "m", "model_digest": "a", "source": "s", "bits": "4",
            "host": "h", "shard": None}
    assert distributed.check_fingerprints([{**base, "rank": 0}, {**base, "rank": 1}], own, nodes) is None
    other = {**base, "rank": 1, "model_digest": "b", "bits": "2"}
    assert "rank 1 (10.0.0.2:2, host h) serves m (s, 2-bit), which is not the same prepared model" in \
        distributed.check_fingerprints([{**base, "rank": 0}, other], own, nodes)
    shard = {**base, "rank": 1, "shard": {"rank": 0, "ranks": 2, "ownership": own.digest(), "kind": "round-robin"}}
    assert "holds the experts of rank 0 of 2" in distributed.check_fingerprints([{**base, "rank": 0}, shard], own, nodes)
    shard["shard"] = {"rank": 1, "ranks": 2, "ownership": "x", "kind": "balanced"}
    assert "another ownership map" in distributed.check_fingerprints([{**base, "rank": 0}, shard], own, nodes)


# ------------------------------------------------------------------------------ every tiny architecture

PAIR = r'''
import json, sys
import numpy as np
import mlx_lm
from mlx_lm.sample_utils import make_sampler
from llm_flash_moe.cluster import distributed, ring
from llm_flash_moe.engine.loader import load_flash_model
from llm_flash_moe.cluster.leader import Leader, LeaderModel
from llm_flash_moe.cluster.ownership import Ownership

model_dir, nodes, k = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
flash = load_flash_model(model_dir, experts_per_token=k)
prompt = list(range(5, 40))

def generate(model):
    out = [(r.token, np.array(r.logprobs)) for r in mlx_lm.stream_generate(
        model, flash.tokenizer, prompt, max_tokens=16, sampler=make_sampler(0.0))]
    return [t for t, _ in out], np.stack([lp for _, lp in out])

alone, alone_lp = generate(flash.model)
flash.bank.clear()  # rank 0 then holds only what it reads as rank 0
group = ring.init_ring(nodes, 0)
cluster = distributed.Cluster(group, 0, nodes, Ownership.for_model(flash.manifest, 2), flash.manifest.name)
cluster.wait_each_all_sum = sys.argv[4:] == ["wait"]  # what MLX's CUDA backend does
leader = Leader(flash, cluster, lambda: None)
cluster.handshake(flash)
distributed.attach(flash, cluster)
together, together_lp = generate(LeaderModel(flash.model, leader))
ranks = leader.stats()
leader.stop()
top2 = np.sort(alone_lp, axis=-1)[:, -2:]
print(json.dumps({"alone": alone, "together": together, "ranks": ranks,
                  "max_logprob_diff": float(np.abs(alone_lp - together_lp).max()),
                  "min_top2_gap": float((top2[:, 1] - top2[:, 0]).min())}))
'''


@pytest.mark.parametrize("model_type,k,wait", [("qwen3_5_moe", 3, False), ("qwen3_5_moe", 3, True),
                                               ("qwen3_next", 2, False), ("qwen3_next", 3, False),
                                               ("qwen3_moe", 2, False), ("qwen3_moe", 3, False)])
def test_every_architecture_two_ranks_match_one_process(models, tmp_path, model_type, k, wait):
    """mlx-lm's generation on rank 0 over two ranks against the same process alone, per tiny architecture
    (qwen3_moe has no shared expert): the same greedy tokens, log-probabilities apart by the summation
    order only (well below the smallest gap between the two best tokens). ``wait``: rank 0 waits for each
    MoE all_sum on evaluated input, as on MLX's CUDA backend."""
    layout = "fused" if model_type == "qwen3_5_moe" else "per_expert"
    model_dir = models.prepared(models.hf(layout=layout, model_type=model_type))
    nodes = [[f"127.0.0.1:{p}"] for p in free_ports(2)]
    worker = subprocess.Popen([sys.executable, "-m", "llm_flash_moe.cluster.worker", str(model_dir), "1", json.dumps(nodes)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(tmp_path))
    try:
        done = subprocess.run([sys.executable, "-c", PAIR, str(model_dir), json.dumps(nodes), str(k)]
                              + (["wait"] if wait else []),
                              capture_output=True, text=True, timeout=180, env=clean_env(tmp_path))
    finally:
        worker.wait(timeout=60)
    assert done.returncode == 0, done.stderr + worker.stdout.read()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(model_type, k, {key: result[key] for key in ("alone", "max_logprob_diff", "min_top2_gap")})
    assert result["together"] == result["alone"], result
    assert result["max_logprob_diff"] < 1e-3 and result["max_logprob_diff"] < result["min_top2_gap"], result
    for rank in result["ranks"]:
        assert rank["moe_all_sums"] == LAYERS * rank["calls"] and rank["held_not_owned"] == 0
    assert (result["ranks"][0]["all_sum_seconds"] > 0) == wait  # only a waited all_sum is timed
    assert worker.returncode == 0  # rank 0 stopped it


DIVERGING_WORKER = r'''
import sys
from llm_flash_moe.engine import streaming_moe
from llm_flash_moe.cluster import worker
real = streaming_moe.route
def route(block, x):  # this rank computes other values: its router picks the next expert
    inds, scores = real(block, x)
    return (inds + 1) % block.num_experts, scores
streaming_moe.route = route
sys.exit(worker.main(sys.argv[1:]))
'''

DIVERGED = r'''
import json, sys
import mlx.core as mx
from llm_flash_moe.cluster import distributed, ring
from llm_flash_moe.engine.loader import load_flash_model
from llm_flash_moe.errors import FlashMoeError
from llm_flash_moe.cluster.leader import Leader, LeaderModel
from llm_flash_moe.cluster.ownership import Ownership
from mlx_lm.models.cache import make_prompt_cache

model_dir, nodes = sys.argv[1], json.loads(sys.argv[2])
flash = load_flash_model(model_dir)
cluster = distributed.Cluster(ring.init_ring(nodes, 0), 0, nodes, Ownership.for_model(flash.manifest, 2), "m")
leader = Leader(flash, cluster, lambda: None)
cluster.handshake(flash)
distributed.attach(flash, cluster)
model, cache = LeaderModel(flash.model, leader), None
try:
    for t in [[5, 6, 7], [8], [9]]:
        cache = cache or make_prompt_cache(model)
        mx.eval(model(mx.array([t]), cache=cache))
    print("no error")
except FlashMoeError as e:
    print(e)
'''


def test_diverging_rank_is_stopped_at_the_next_call(tiny_model, tmp_path):
    """A rank whose routing differs from rank 0's (other hardware or software would compute other values)
    is caught by the routing digests of the next header: one line, and that rank's session ends."""
    nodes = [[f"127.0.0.1:{p}"] for p in free_ports(2)]
    worker = subprocess.Popen([sys.executable, "-c", DIVERGING_WORKER, str(tiny_model), "1", json.dumps(nodes)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(tmp_path))
    try:
        done = subprocess.run([sys.executable, "-c", DIVERGED, str(tiny_model), json.dumps(nodes)],
                              capture_output=True, text=True, timeout=120, env=clean_env(tmp_path))
    finally:
        worker.wait(timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("rank 1 (127.0.0.1:") and "chose other experts than rank 0 before call 2" \
        in done.stdout, done.stdout
    assert worker.returncode == 1 and "left the session" in worker.stdout.read()


# ------------------------------------------------------------------------------ two ranks through the llm CLI


@pytest.mark.parametrize("k", [None, 3])
def test_two_ranks_match_one_process(dirs, cluster, tmp_path, monkeypatch, k):
    """Greedy output token-identical to one process (native k and k=3), prompt cache on and off, over two
    `llm` processes (the second turn by `llm -c`, the cache from disk); each rank reads only experts it owns,
    the ranks' bytes add up to one process's, one all_sum per MoE layer per model call."""
    experts = [] if k is None else ["-o", "experts", str(k)]
    first = ["-m", MODEL, *GREEDY, "-o", "max_tokens", "8", *experts]
    follow = ["-c", *GREEDY, "-o", "max_tokens", "8", *experts]
    off = ["-o", "prompt_cache", "false"]
    want = [reference(dirs["single"], monkeypatch, *first, *off, FIRST),
            reference(dirs["single"], monkeypatch, *follow, *off, SECOND)]
    single_bytes = logged(dirs["single"])[0]["bytes_read"]

    for cache in ([], off):
        runs = [leader_run(dirs["rank0"], tmp_path, *first, *cache, FIRST),
                leader_run(dirs["rank0"], tmp_path, *follow, *cache, SECOND)]
        for (done, record), tokens in zip(runs, want):
            assert done.returncode == 0, done.stderr
            assert record["tokens"] == [tokens]
            leader, worker = record["ranks"]
            assert worker["calls"] == leader["calls"] >= len(tokens)
            for rank in (leader, worker):
                assert rank["moe_all_sums"] == LAYERS * leader["calls"]  # exactly one per MoE layer per call
                assert rank["held_not_owned"] == 0 and rank["held"] > 0  # only experts it owns
            # every all_sum rank 0 made is a MoE layer's or the protocol's: the handshake (3), one header per
            # call, the token ids of prompt chunks longer than the header holds, a cache state (2)
            assert record["all_sums_before_stats"] == leader["moe_all_sums"] + leader["protocol_collectives"]
            extra = leader["protocol_collectives"] - 3 - leader["calls"] - 2 * leader["state_transfers"]
            assert 0 <= extra <= 2
        (_, one), (_, two) = runs
        assert sum(r["bytes_read"] for r in one["ranks"]) == single_bytes
        assert one["ranks"][0]["bytes_read"] == one["bytes_read"]
        restored = two["ranks"][1]["state_transfers"]
        assert restored == (1 if not cache else 0)  # the disk snapshot went to rank 1 once
        assert logged(dirs["rank0"])[-1]["prompt_tokens_cached"] > 0 if not cache else True
    assert "rank 1 of 2 serving" in cluster.log(1)


def test_llm_chat_over_two_ranks_while_another_llm_runs_alone(dirs, cluster, tmp_path, monkeypatch):
    """`llm chat`: one process, two turns, the second continuing from the state in memory (sent to rank 1
    once), token-identical to one process. One llm process leads the workers at a time: while the chat
    holds them, another `llm` warns and answers alone at once (same tokens as one process)."""
    chat = ["chat", "-m", MODEL, *GREEDY, "-o", "max_tokens", "6"]
    done = subprocess.run([sys.executable, "-c", RECORDER, *chat, "-o", "prompt_cache", "false"],
                          input=f"{FIRST}\n{SECOND}\nquit\n", capture_output=True, text=True, timeout=120,
                          env=clean_env(dirs["single"], RECORD=str(tmp_path / "single.json")))
    assert done.returncode == 0, done.stderr
    want = json.loads((tmp_path / "single.json").read_text())["tokens"]
    leading = subprocess.Popen([sys.executable, "-c", RECORDER, *chat], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env=clean_env(dirs["rank0"], RECORD=str(tmp_path / "cluster.json")))
    try:
        leading.stdin.write(FIRST + "\n")
        leading.stdin.flush()

        def answered():
            try:
                return len(logged(dirs["rank0"])) == 1
            except sqlite3.Error:  # not written yet, or being written
                return False

        cluster.wait_for(answered)
        args = ["-m", MODEL, *GREEDY, "-o", "max_tokens", "4", "-o", "prompt_cache", "false", SECOND]
        start = time.monotonic()
        other, alone = leader_run(dirs["rank0"], tmp_path, *args)
        assert other.returncode == 0, other.stderr
        assert "Warning: running tiny on this machine alone: another llm process on this machine is using its " \
               "cluster" in other.stderr
        assert alone["ranks"] is None and time.monotonic() - start < 30
        assert alone["tokens"] == [reference(dirs["single"], monkeypatch, *args)]
    finally:
        out, err = leading.communicate(f"{SECOND}\nquit\n", timeout=120)
    assert leading.returncode == 0, err
    record = json.loads((tmp_path / "cluster.json").read_text())
    assert len(want) == 2 and record["tokens"] == want
    assert record["ranks"][1]["state_transfers"] == 1  # turn 2 continued from the memory snapshot
    chat_turns = [r for r in logged(dirs["rank0"]) if r["generation_tokens"] == 6]
    assert [r["prompt_cache"] for r in chat_turns] == [None, "memory"]


# ------------------------------------------------------------------------------ through the keep-alive engine


def test_the_engine_leads_the_cluster(dirs, cluster, engines, tmp_path, monkeypatch):
    """Through the engine (rank 0 is the engine process, kept between commands) a cluster's greedy answers are
    token-identical to the in-process cluster's and to one process's, `llm -c` included; `ps` shows 2 ranks."""
    first = ["-m", MODEL, *GREEDY, "-o", "max_tokens", "8", FIRST]
    follow = ["-c", *GREEDY, "-o", "max_tokens", "8", SECOND]
    want = [reference(dirs["single"], monkeypatch, *first, "-o", "prompt_cache", "false"),
            reference(dirs["single"], monkeypatch, *follow, "-o", "prompt_cache", "false")]
    done, in_process = leader_run(dirs["rank0"], tmp_path, *first, "-o", "prompt_cache", "false")
    assert done.returncode == 0, done.stderr
    assert in_process["ranks"] is not None and in_process["tokens"] == [want[0]]
    served = [engine_run(dirs["rank0"], tmp_path, *args) for args in (first, follow)]
    for (done, records), tokens in zip(served, want):
        assert done.returncode == 0, done.stderr
        assert [r["tokens"] for r in records] == [tokens] and records[0]["ranks"] == 2
    assert served[0][1][0]["pid"] == served[1][1][0]["pid"]  # one engine served both
    assert logged(dirs["rank0"])[-1]["prompt_cache"] == "memory"  # -c continued from the engine's memory
    status = engine_status(dirs["rank0"], monkeypatch)
    assert status["pid"] == served[0][1][0]["pid"] and status["ranks"] == 2
    from llm.cli import cli

    listing = CliRunner().invoke(cli, ["flash-moe", "ps"]).output
    assert "2 ranks" in listing, listing


def test_a_cluster_started_or_stopped_after_the_engine_gets_a_new_engine(dirs, engines, tmp_path, monkeypatch):
    """An engine started before the cluster file appeared is replaced by one that leads the cluster; when the
    cluster stops, by one that runs alone. The answers stay those of one process."""
    args = ["-m", MODEL, *GREEDY, "-o", "max_tokens", "6", "-o", "prompt_cache", "false", FIRST]
    want = reference(dirs["single"], monkeypatch, *args)
    done, (alone,) = engine_run(dirs["rank0"], tmp_path, *args)
    assert done.returncode == 0 and alone["ranks"] is None and alone["tokens"] == want, done.stderr
    c = LocalCluster([dirs["rank0"], dirs["rank1"]], logs=dirs["rank0"].parent)
    try:
        done, (led,) = engine_run(dirs["rank0"], tmp_path, *args)
        assert done.returncode == 0, done.stderr
        assert led["pid"] != alone["pid"] and led["ranks"] == 2 and led["tokens"] == want
        assert not running(alone["pid"])
    finally:
        c.stop()
    done, (after,) = engine_run(dirs["rank0"], tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert after["pid"] != led["pid"] and after["ranks"] is None and after["tokens"] == want


def test_killed_worker_through_the_engine(dirs, cluster, engines, tmp_path, monkeypatch):
    """A worker killed mid-answer: the command gets one line, the engine exits after it (MLX forms one group
    per process), and the next command starts an engine that leads the restarted worker."""
    done, (warm,) = engine_run(dirs["rank0"], tmp_path, "-m", MODEL, *GREEDY, "-o", "max_tokens", "2", FIRST)
    assert done.returncode == 0 and warm["ranks"] == 2, done.stderr
    rank1 = cluster.session_pid(1)
    llm = subprocess.Popen([sys.executable, "-m", "llm", "-m", MODEL, *GREEDY, "-o", "max_tokens", "100000",
                            "-o", "prompt_cache", "false", "-o", "thinking", "false", FIRST], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env=clean_env(dirs["rank0"], LLM_FLASH_MOE_KEEP_ALIVE="120"))
    os.set_blocking(llm.stdout.fileno(), False)
    deadline = time.monotonic() + 60
    while not llm.stdout.read(1):  # generating
        assert llm.poll() is None and time.monotonic() < deadline, llm.stderr.read()
        time.sleep(0.05)
    os.kill(rank1, signal.SIGKILL)
    llm.wait(timeout=60)
    lines = [line for line in llm.stderr.read().splitlines() if line.strip()]
    assert llm.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("Error: rank 1 (127.0.0.1:") and "left the cluster (connection lost); the engine " \
        "ends after this answer" in lines[0], lines
    deadline = time.monotonic() + 15
    while running(warm["pid"]):  # the engine ended after that answer
        assert time.monotonic() < deadline, "the engine did not exit after losing its ranks"
        time.sleep(0.1)
    from llm_flash_moe.service import protocol

    monkeypatch.setenv("LLM_USER_PATH", str(dirs["rank0"]))
    assert "exiting: this engine cannot lead its cluster" in protocol.log_path("tiny").read_text()  # its log, still
    cluster.wait_for(lambda: cluster.session_pid(1) not in (None, rank1))
    done, (again,) = engine_run(dirs["rank0"], tmp_path, "-m", MODEL, *GREEDY, "-o", "max_tokens", "2", FIRST)
    assert done.returncode == 0, done.stderr
    assert again["pid"] != warm["pid"] and again["ranks"] == 2 and again["tokens"] == warm["tokens"]


# ------------------------------------------------------------------------------ faults


def test_killed_rank_gives_one_line_in_time_then_the_cluster_serves_again(dirs, cluster, tmp_path):
    rank1 = cluster.session_pid(1)
    llm = subprocess.Popen([sys.executable, "-m", "llm", "-m", MODEL, *GREEDY, "-o", "max_tokens", "100000",
                            "-o", "prompt_cache", "false", "-o", "thinking", "false", FIRST], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=clean_env(dirs["rank0"]))
    os.set_blocking(llm.stdout.fileno(), False)
    deadline = time.monotonic() + 60
    while not llm.stdout.read(1):  # generating
        assert llm.poll() is None and time.monotonic() < deadline, llm.stderr.read()
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    llm.wait(timeout=60)
    elapsed = time.monotonic() - killed
    err = llm.stderr.read()
    print(f"killed rank: rank 0 exited {elapsed:.2f} s later")
    assert llm.returncode == 1
    assert elapsed < 30
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: rank 1 (127.0.0.1:") and "left the cluster (connection lost)" in lines[0]
    # the supervisor starts a new session: the next llm command is served by the two ranks again
    cluster.wait_for(lambda: cluster.session_pid(1) not in (None, rank1))
    done, record = leader_run(dirs["rank0"], tmp_path, "-m", MODEL, *GREEDY, "-o", "max_tokens", "4", FIRST)
    assert done.returncode == 0, done.stderr
    assert record["ranks"] is not None and record["ranks"][1]["calls"] > 0


def test_hung_rank_is_cut_off(dirs, cluster, tmp_path):
    """A rank that stops answering (SIGSTOP) is cut off by the watchdog: one line after the timeout."""
    rank1 = cluster.session_pid(1)
    llm = subprocess.Popen([sys.executable, "-m", "llm", "-m", MODEL, *GREEDY, "-o", "max_tokens", "100000",
                            "-o", "prompt_cache", "false", "-o", "thinking", "false", FIRST], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=clean_env(dirs["rank0"], **{ring.TIMEOUT_ENV: "3"}))
    os.set_blocking(llm.stdout.fileno(), False)
    deadline = time.monotonic() + 60
    while not llm.stdout.read(1):
        assert llm.poll() is None and time.monotonic() < deadline, llm.stderr.read()
        time.sleep(0.05)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        llm.wait(timeout=60)
        elapsed = time.monotonic() - stopped
    finally:
        os.kill(rank1, signal.SIGKILL)
    err = llm.stderr.read()
    lines = [line for line in err.splitlines() if line.strip()]
    assert llm.returncode == 1 and len(lines) == 1, err
    assert "rank 1 (127.0.0.1:" in lines[0] and "did not answer for 3 s" in lines[0]
    print(f"hung rank: rank 0 exited {elapsed:.2f} s later (timeout 3 s)")
    assert 3 <= elapsed < 15


def test_cluster_not_answering_runs_alone(dirs, tmp_path, monkeypatch, tiny_model):
    """The cluster file is there but no rank answers: rank 0 warns and answers alone (it holds every
    expert), with the same tokens as one process."""
    config = ring.ClusterConfig("tiny", [["127.0.0.1:%d" % p] for p in free_ports(2)],
                                       Ownership.round_robin({0: 8, 1: 8, 2: 8, 3: 8}, 2).to_json(), pid=os.getpid())
    monkeypatch.setenv("LLM_USER_PATH", str(dirs["rank0"]))
    config.write()
    args = ["-m", MODEL, *GREEDY, "-o", "max_tokens", "5", "-o", "prompt_cache", "false", FIRST]
    start = time.monotonic()
    done, record = leader_run(dirs["rank0"], tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 60  # MLX retries the connection for about 31 s, holding the GIL
    assert "Warning: running tiny on this machine alone: the other ranks (127.0.0.1:" in done.stderr
    assert record["ranks"] is None
    assert record["tokens"] == [reference(dirs["single"], monkeypatch, *args)]


def test_rank_with_another_model_is_refused(dirs, tmp_path, monkeypatch, tiny_model, models):
    """Rank 1 serves a model prepared with other settings: rank 0 says so in one line, and rank 1 waits for
    the next session."""
    other = models.prepared(models.hf(), bits=8)
    user_dir(dirs["rank1"], monkeypatch, {"tiny": other})
    c = LocalCluster([dirs["rank0"], dirs["rank1"]], logs=tmp_path)
    try:
        done = subprocess.run([sys.executable, "-m", "llm", "-m", MODEL, *GREEDY, "-o", "max_tokens", "3", FIRST],
                              capture_output=True, text=True, timeout=120, env=clean_env(dirs["rank0"]))
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert "Error: rank 1 (127.0.0.1:" in lines[0] and "8-bit), which is not the same prepared model" in lines[0]
        c.wait_for(lambda: "refused" in c.log(1))
    finally:
        c.stop()


# ------------------------------------------------------------------------------ prepare --rank


def test_sharded_copies_serve_together_and_not_alone(tmp_path, monkeypatch, tiny_model, dirs):
    """`prepare --rank R --ranks 2 --popularity COUNTS` writes only rank R's experts of the map balanced on
    counts measured by `popularity` (the rest stays holes); such a copy refuses to run alone, and two of them
    serve together with the same tokens as a full copy."""
    from llm_flash_moe.conversion.prepare import PrepareOptions, prepare
    from llm_flash_moe.flash_layout import Manifest

    from llm_flash_moe.engine.loader import load_flash_model
    from llm_flash_moe.cluster.popularity import count_choices

    flash = load_flash_model(tiny_model)
    try:
        tokens = flash.tokenizer.encode((Path(__file__).parent / "data" / "heldout.txt").read_text())[:300]
        counts = count_choices(flash, tokens, window=100)
    finally:
        flash.close()
    assert all(c.sum() == len(tokens) * 2 for c in counts.values())  # every token chose k=2 experts per layer
    popularity = tmp_path / "counts.json"
    write_counts(popularity, counts)
    balanced = Ownership.balanced({layer: c.size for layer, c in counts.items()}, 2, read_counts(popularity))
    source = tiny_model.parent / "source"
    shards = []
    for rank in (0, 1):
        out = tmp_path / f"shard{rank}"
        prepare(PrepareOptions(source=str(source), name="tiny", output=out, rank=rank, ranks=2, popularity=popularity),
                echo=lambda _: None)
        shards.append(out)
    manifest = Manifest.load(shards[1])
    full = Manifest.load(tiny_model)
    assert distributed.model_digest(manifest) == distributed.model_digest(full)
    assert distributed.shard_ownership(manifest).digest() == balanced.digest()
    for layer, whole in zip(manifest.expert_layers, full.expert_layers):
        mine = [e for e, c in enumerate(layer.checksums) if c]
        assert mine == np.nonzero(balanced.owned(layer.layer, 1))[0].tolist()
        assert [layer.checksums[e] for e in mine] == [whole.checksums[e] for e in mine]
        size = (shards[1] / layer.file).stat()
        assert size.st_size == layer.file_size and size.st_blocks * 512 < layer.file_size  # holes
    from llm_flash_moe.verify import verify_model

    assert verify_model(shards[1], manifest).ok
    args = ["-m", MODEL, *GREEDY, "-o", "max_tokens", "6", "-o", "prompt_cache", "false", FIRST]
    want = reference(dirs["single"], monkeypatch, *args)
    users = [user_dir(tmp_path / f"u{r}", monkeypatch, {"tiny": shards[r]}) for r in (0, 1)]
    done = subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True, text=True, timeout=120,
                          env=clean_env(users[0]))
    assert done.returncode == 1 and done.stderr.strip().startswith(
        "Error: tiny on this machine holds only the experts of rank 0 of 2"), done.stderr
    c = LocalCluster(users, logs=tmp_path)
    try:
        done, record = leader_run(users[0], tmp_path, *args)
        assert done.returncode == 0, done.stderr
        assert record["tokens"] == [want]
    finally:
        c.stop()


def test_real_launcher(dirs, tmp_path, monkeypatch):
    """The user story with MLX's own launcher: `mlx.launch -n 2 --backend ring -- llm flash-moe worker tiny`
    (both ranks on this machine), then a plain `llm -m tiny-flash` joins; stopping the launcher removes the
    cluster file."""
    port = free_ports(1)[0]
    launch = Path(sys.executable).parent / "mlx.launch"  # MLX's console script, installed beside python
    if not launch.exists():
        pytest.skip("mlx.launch is not installed beside this python")
    launcher = subprocess.Popen([str(launch), "-n", "2", "--backend", "ring",
                                 "-p", str(port), "--", sys.executable, "-m", "llm", "flash-moe", "worker", "tiny"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=clean_env(dirs["rank0"]))
    file = dirs["rank0"] / "flash-moe" / "cluster" / "tiny.json"
    try:
        deadline = time.monotonic() + 60
        while not file.exists():
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        args = ["-m", MODEL, *GREEDY, "-o", "max_tokens", "5", "-o", "prompt_cache", "false", FIRST]
        done, record = leader_run(dirs["rank0"], tmp_path, *args)
        assert done.returncode == 0, done.stderr
        assert record["ranks"] is not None and record["ranks"][1]["calls"] == record["ranks"][0]["calls"]
        assert record["tokens"] == [reference(dirs["single"], monkeypatch, *args)]
        assert [int(p.split(":")[1]) for n in json.loads(file.read_text())["nodes"] for p in n] == [port, port + 1]
    finally:
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C in the terminal: the launcher and every local rank
        try:
            launcher.wait(timeout=30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    assert not file.exists()
