"""Versioned drafter checkpoints in a directory, with an optional Redis pointer.

Layout::

    ROOT/v000003/config.json             HF config of the drafter
    ROOT/v000003/model.safetensors       weights (safetensors only, never pickle)
    ROOT/v000003/accept_head.safetensors optional acceptance-prediction head
    ROOT/v000003/meta.json               version, parent, sha256 of config and weights, stats
    ROOT/CURRENT                         the serving version, replaced atomically
    ROOT/decisions.jsonl                 every promote / reject / rollback, with reason and metrics

The directory is the source of truth. With a Redis client, promote and
rollback also ``SET specd:drafter:current <N>`` and ``XADD specd:checkpoints``
so drafters can swap without polling the file system; Redis failures there
are logged, never raised. Version numbers are ints here and "vN" strings
(`version_name`) on the wire.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.file_cache import sha256_file

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
ACCEPT_HEAD_FILE = "accept_head.safetensors"
META_FILE = "meta.json"
CURRENT_FILE = "CURRENT"
DECISIONS_FILE = "decisions.jsonl"
ALLOWED_FILES = frozenset({CONFIG_FILE, MODEL_FILE, ACCEPT_HEAD_FILE, META_FILE})
REDIS_CURRENT_KEY = "specd:drafter:current"
REDIS_EVENTS_STREAM = "specd:checkpoints"

_VERSION_DIR = re.compile(r"^v(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupted, unsafe (pickle) or does not fit its config."""


@dataclass
class LoadedDrafter:
    model: torch.nn.Module
    accept_head: torch.nn.Module | None
    version: int
    meta: dict


def version_name(version: int) -> str:
    return f"v{version}"


def parse_version(text: str | int) -> int:
    """Accepts 3, "3", "v3" or "v000003"."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"v?(\d+)", str(text).strip())
    if not match:
        raise ValueError(f"not a checkpoint version: {text!r}")
    return int(match.group(1))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide CURRENT from drafters running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CheckpointStore:
    def __init__(self, root: str | os.PathLike, redis_client=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis = redis_client

    # -- reading -----------------------------------------------------------

    def versions(self) -> list[int]:
        found = []
        for entry in self.root.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def current(self) -> int | None:
        try:
            text = (self.root / CURRENT_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return parse_version(text) if text else None

    def meta(self, version: int) -> dict:
        try:
            return json.loads((self.path(version) / META_FILE).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {version_name(version)} has no {META_FILE}") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"checkpoint {version_name(version)}: bad {META_FILE}: {err}") from None

    def decisions(self) -> list[dict]:
        try:
            lines = (self.root / DECISIONS_FILE).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def statuses(self) -> dict[int, str]:
        """Each version's latest decision ("promote", "reject", "rollback") or "new"."""
        latest = {version: "new" for version in self.versions()}
        for decision in self.decisions():
            if decision.get("version") in latest:
                latest[decision["version"]] = decision["action"]
        return latest

    def status(self, version: int) -> str:
        return self.statuses().get(version, "new")

    # -- writing -----------------------------------------------------------

    def publish(self, model: torch.nn.Module, meta: dict | None = None,
                accept_head: torch.nn.Module | None = None) -> int:
        """Writes a new version (temp dir, then an atomic rename) and returns its number.

        `meta` may carry parent_version, tokenizer_fingerprint, stats or
        anything JSON-serialisable; version, created_ms and file hashes are
        filled in here. Concurrent publishers (several trainer workers on a
        shared volume) each get a distinct number: the rename fails if taken.
        """
        from safetensors.torch import save_model

        meta = dict(meta or {})
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
        try:
            model.config.to_json_file(str(staging / CONFIG_FILE))
            save_model(model, str(staging / MODEL_FILE))
            files = {CONFIG_FILE: sha256_file(staging / CONFIG_FILE), MODEL_FILE: sha256_file(staging / MODEL_FILE)}
            if accept_head is not None:
                save_model(accept_head, str(staging / ACCEPT_HEAD_FILE))
                files[ACCEPT_HEAD_FILE] = sha256_file(staging / ACCEPT_HEAD_FILE)
                meta["accept_head"] = accept_head.spec()
            meta.setdefault("parent_version", self.current())
            meta["created_ms"] = int(time.time() * 1000)
            meta["files"] = files
            # mkdtemp makes the directory private; drafters may run as another user on a shared volume.
            os.chmod(staging, 0o755)
            for _attempt in range(100):
                version = max(self.versions(), default=0) + 1
                meta["version"] = version
                (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
                for name in (*files, META_FILE):
                    os.chmod(staging / name, 0o644)
                try:
                    os.rename(staging, self.path(version))
                except OSError:
                    if self.path(version).exists():
                        continue  # another publisher took this number
                    raise
                log.info("published checkpoint %s", version_name(version))
                return version
            raise CheckpointError("could not allocate a checkpoint version after 100 attempts")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def promote(self, version: int, reason: str, metrics: dict | None = None) -> None:
        self._require(version)
        self._set_current(version)
        self._decide("promote", version, reason, metrics)

    def reject(self, version: int, reason: str, metrics: dict | None = None) -> None:
        self._require(version)
        self._decide("reject", version, reason, metrics)

    def rollback(self, version: int, reason: str = "manual rollback", metrics: dict | None = None) -> None:
        self._require(version)
        previous = self.current()
        self._set_current(version)
        self._decide("rollback", version, reason, {**(metrics or {}), "previous": previous})

    def remove(self, version: int) -> None:
        """Deletes a version's files (never the current one); its decisions stay logged."""
        if version == self.current():
            raise CheckpointError(f"{version_name(version)} is current and cannot be removed")
        shutil.rmtree(self.path(version), ignore_errors=True)

    def _require(self, version: int) -> None:
        if not self.path(version).is_dir():
            raise CheckpointError(f"no checkpoint {version_name(version)} in {self.root}")

    def _set_current(self, version: int) -> None:
        _atomic_write_text(self.root / CURRENT_FILE, f"{version}\n")

    def _decide(self, action: str, version: int, reason: str, metrics: dict | None) -> None:
        decision = {"ts_ms": int(time.time() * 1000), "action": action, "version": version,
                    "reason": reason, "metrics": metrics or {}, "current": self.current()}
        line = json.dumps(decision, sort_keys=True, default=str) + "\n"
        # One O_APPEND write per line, so concurrent workers never interleave a record.
        fd = os.open(self.root / DECISIONS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        log.info("checkpoint %s %s: %s", version_name(version), action, reason)
        if action in ("promote", "rollback"):
            self._notify(action, version)

    def _notify(self, action: str, version: int) -> None:
        if self.redis is None:
            return
        try:
            self.redis.set(REDIS_CURRENT_KEY, str(version))
            self.redis.xadd(REDIS_EVENTS_STREAM, {"action": action, "version": str(version),
                                                  "name": version_name(version), "path": str(self.path(version))},
                            maxlen=1000, approximate=True)
        except Exception as err:  # noqa: BLE001 - the directory already holds the decision
            log.warning("checkpoint notification to Redis failed: %s", err)

    # -- loading -----------------------------------------------------------

    def verify(self, version: int) -> dict:
        """Checks the directory holds only known files and the hashes match; returns meta."""
        directory = self.path(version)
        if not directory.is_dir():
            raise CheckpointError(f"no checkpoint {version_name(version)} in {self.root}")
        unexpected = sorted(p.name for p in directory.iterdir() if p.name not in ALLOWED_FILES)
        if unexpected:
            raise CheckpointError(
                f"checkpoint {version_name(version)} holds unexpected files {unexpected}; only safetensors "
                f"weights are loaded (pickle formats such as .bin/.pt are refused)"
            )
        meta = self.meta(version)
        files = meta.get("files") or {}
        for required in (CONFIG_FILE, MODEL_FILE):  # both decide what gets built and loaded
            if required not in files:
                raise CheckpointError(f"checkpoint {version_name(version)}: meta lists no {required}")
        for name, expected in files.items():
            if name not in ALLOWED_FILES:
                raise CheckpointError(f"checkpoint {version_name(version)}: meta lists unexpected file {name}")
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint {version_name(version)}: missing {name}")
            actual = sha256_file(path)
            if actual != expected:
                raise CheckpointError(
                    f"checkpoint {version_name(version)}: {name} sha256 {actual[:12]}... != recorded {expected[:12]}..."
                )
        return meta

    def load(self, version: int | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> LoadedDrafter:
        """Builds the drafter from config.json and loads only verified safetensors (the model in
        `dtype`, the acceptance head always in float32)."""
        from safetensors.torch import load_model
        from transformers import AutoConfig

        from specdec.models.vocab_head import build_causal_lm

        if version is None:
            version = self.current()
            if version is None:
                raise CheckpointError(f"{self.root} has no CURRENT checkpoint")
        meta = self.verify(version)
        directory = self.path(version)
        try:
            config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
            model = build_causal_lm(config)
        except Exception as err:  # noqa: BLE001 - any config problem is a bad checkpoint
            raise CheckpointError(f"checkpoint {version_name(version)}: bad {CONFIG_FILE}: {err}") from err
        try:
            load_model(model, str(directory / MODEL_FILE), strict=True)
        except Exception as err:  # noqa: BLE001 - header corruption, shape or key mismatch
            raise CheckpointError(f"checkpoint {version_name(version)}: weights do not load: {err}") from err
        model.to(device=device, dtype=dtype).eval()
        accept_head = None
        if ACCEPT_HEAD_FILE in meta["files"]:
            from specdec.models.accept_head import AcceptHead

            try:
                accept_head = AcceptHead.from_spec(meta["accept_head"])
                load_model(accept_head, str(directory / ACCEPT_HEAD_FILE), strict=True)
            except Exception as err:  # noqa: BLE001
                raise CheckpointError(f"checkpoint {version_name(version)}: accept head does not load: {err}") from err
            # Kept in float32 whatever the drafter's dtype: it is tiny, and callers feed it float hidden states.
            accept_head.to(device=device, dtype=torch.float32).eval()
        return LoadedDrafter(model=model, accept_head=accept_head, version=version, meta=meta)


def read_redis_pointer(client) -> int | None:
    """The version drafters should serve according to Redis (None if unset)."""
    value = client.get(REDIS_CURRENT_KEY)
    if value is None:
        return None
    return parse_version(value.decode() if isinstance(value, bytes) else value)
