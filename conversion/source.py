"""Where the checkpoint comes from: a local directory, or a Hugging Face hub repo fetched into the hub cache."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import FlashMoeError
from .checkpoint import check_metadata_files, METADATA_PATTERNS, load_config, shard_names

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Source:
    id: str  # repo id, or the absolute path of a local directory
    directory: Path  # holds config.json and the tokenizer files
    shards: List[str]
    config: dict
    revision: Optional[str] = None
    repo_id: Optional[str] = None  # set for hub sources: shards are downloaded one at a time
    delete_shards: bool = False
    shard_sizes: Dict[str, int] = field(default_factory=dict)

    def fetch(self, name: str) -> Path:
        """The local path of one shard, downloading it first for a shard-by-shard hub source."""
        if self.repo_id is None:
            path = self.directory / name
            if not path.exists():
                raise FlashMoeError(f"shard {name} is missing from {self.directory}; download it again")
            return path
        from huggingface_hub import hf_hub_download

        with hub_errors(self.repo_id):
            return Path(hf_hub_download(self.repo_id, name, revision=self.revision))

    def missing_bytes(self) -> int:
        """Bytes still to download into the hub cache (0 for local sources)."""
        if self.repo_id is None:
            return 0
        return sum(size for name, size in self.shard_sizes.items() if not (self.directory / name).exists())

    def release(self, name: str) -> None:
        """Delete a converted shard from the hub cache (only with --delete-source)."""
        if not self.delete_shards:
            return
        path = self.directory / name
        if path.exists() or path.is_symlink():
            blob = path.resolve()
            path.unlink()
            blob.unlink(missing_ok=True)


# Transport failures of the HTTP clients huggingface_hub has used (httpx, requests): no network, DNS, timeouts.
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                   "NetworkError", "TransportError", "ProxyError", "RemoteProtocolError", "SSLError"}


def is_network_error(e: BaseException) -> bool:
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__)


@contextlib.contextmanager
def hub_errors(repo_id: str):
    """Turn huggingface_hub's exceptions into one-line messages that say what to do."""
    from huggingface_hub import errors

    try:
        yield
    except errors.HFValidationError:
        raise FlashMoeError(f"{repo_id} is not a valid Hugging Face repo id (owner/name)")
    except errors.GatedRepoError:
        raise FlashMoeError(f"{repo_id} is gated: accept its terms on huggingface.co, then set HF_TOKEN")
    except errors.RepositoryNotFoundError:
        raise FlashMoeError(
            f"{repo_id} was not found on the Hugging Face hub (if it is private, set HF_TOKEN to a token "
            "that can read it); a local checkpoint must be given as an existing directory"
        )
    except errors.RevisionNotFoundError:
        raise FlashMoeError(f"{repo_id} has no such revision")
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, ConnectionError):
        raise FlashMoeError(
            f"cannot reach the Hugging Face hub and {repo_id} is not in the local cache; "
            "check the network (or unset HF_HUB_OFFLINE)"
        )
    except errors.HfHubHTTPError as e:
        raise FlashMoeError(f"the Hugging Face hub refused {repo_id}: {str(e).splitlines()[0]}")
    except Exception as e:
        if is_network_error(e):
            raise FlashMoeError(
                f"cannot reach the Hugging Face hub for {repo_id} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no details'}); check the network and run the same "
                "command again (a download resumes where it stopped)"
            ) from None
        raise


def resolve_source(source: str, revision: Optional[str] = None, delete_shards: bool = False) -> Source:
    """Find (and for hub sources, download) a checkpoint; config and shard list are checked here."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FlashMoeError(f"{source} is a file; give the checkpoint's directory")
        if delete_shards:
            raise FlashMoeError("--delete-source only applies to hub sources; it never deletes your own files")
        config = load_config(path)
        check_metadata_files(path)
        shards = shard_names(path)
        for name in shards:
            if not (path / name).exists():
                raise FlashMoeError(f"shard {name} listed in the index is missing from {path}")
        return Source(str(path.resolve()), path.resolve(), shards, config)
    if not REPO_ID.fullmatch(source):
        raise FlashMoeError(f"{source} is neither a checkpoint directory nor a Hugging Face repo id (owner/name)")
    return _hub_source(source, revision, delete_shards)


def _hub_source(repo_id: str, revision: Optional[str], delete_shards: bool) -> Source:
    from huggingface_hub import HfApi, snapshot_download

    sizes: Dict[str, int] = {}
    with hub_errors(repo_id):
        if os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            revision = info.sha
            sizes = {s.rfilename: s.size or 0 for s in info.siblings if s.rfilename.endswith(".safetensors")}
        directory = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(METADATA_PATTERNS)))
    cache = directory.parent.parent  # the repo's cache folder: snapshot files link into its blobs/
    config = load_config(directory, cache)
    check_metadata_files(directory, cache)
    has_index = (directory / "model.safetensors.index.json").exists()
    shards = sorted(sizes) if sizes and not has_index else shard_names(directory, cache)
    return Source(repo_id, directory, shards, config, revision=revision, repo_id=repo_id,
                  delete_shards=delete_shards, shard_sizes=sizes)
