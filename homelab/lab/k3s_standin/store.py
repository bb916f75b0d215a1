"""The object store: every object, a global resourceVersion, an event log for watches, persisted as JSON.

State lives in <data-dir>/server/db/state.json, rewritten atomically (temp file, fsync, rename)
after each change, and loaded at start.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVENT_HISTORY = 5000


@dataclass
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    storage_key: str
    obj: dict[str, Any]


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


class Store:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = 0
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        self.extra: dict[str, Any] = {}
        self.events: collections.deque[Event] = collections.deque(maxlen=EVENT_HISTORY)
        self.oldest_event_rv = 0
        self.closed = False
        self._batch = 0
        self._dirty = False

    # --- persistence
    def load(self) -> bool:
        if self.path is None or not self.path.exists():
            return False
        data = json.loads(self.path.read_text(encoding="utf-8"))
        with self.lock:
            self.rv = int(data.get("resourceVersion", 0))
            self.objects = data.get("objects") or {}
            self.extra = data.get("extra") or {}
            self.oldest_event_rv = self.rv
        return True

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"resourceVersion": self.rv, "objects": self.objects, "extra": self.extra},
                          separators=(",", ":"))
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def mark_dirty(self) -> None:
        with self.lock:
            self._dirty = True
            if self._batch == 0:
                self._save()
                self._dirty = False

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Changes inside are saved once, at the end."""
        with self.lock:
            self._batch += 1
            try:
                yield
            finally:
                self._batch -= 1
                if self._batch == 0 and self._dirty:
                    self._save()
                    self._dirty = False

    # --- reads
    def get(self, storage_key: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self.objects.get(storage_key, {}).get(f"{namespace}/{name}")
            return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, storage_key: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            bucket = self.objects.get(storage_key, {})
            keys = sorted(k for k in bucket if namespace is None or k.startswith(f"{namespace}/"))
            return [copy.deepcopy(bucket[k]) for k in keys]

    def storage_keys(self) -> list[str]:
        with self.lock:
            return list(self.objects)

    # --- writes
    def next_rv(self) -> int:
        with self.lock:
            self.rv += 1
            return self.rv

    def put(self, storage_key: str, obj: dict[str, Any], event: str) -> dict[str, Any]:
        """Store `obj` (ADDED or MODIFIED) with a new resourceVersion; returns a copy."""
        with self.lock:
            rv = self.next_rv()
            obj["metadata"]["resourceVersion"] = str(rv)
            stored = copy.deepcopy(obj)
            self.objects.setdefault(storage_key, {})[object_key(obj)] = stored
            self._event(Event(rv, event, storage_key, stored))
            self.mark_dirty()
            return copy.deepcopy(stored)

    def remove(self, storage_key: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            bucket = self.objects.get(storage_key, {})
            obj = bucket.pop(f"{namespace}/{name}", None)
            if obj is None:
                return None
            if not bucket:
                self.objects.pop(storage_key, None)
            rv = self.next_rv()
            gone = copy.deepcopy(obj)
            gone["metadata"]["resourceVersion"] = str(rv)
            self._event(Event(rv, "DELETED", storage_key, gone))
            self.mark_dirty()
            return copy.deepcopy(gone)

    def _event(self, event: Event) -> None:
        if len(self.events) == self.events.maxlen:
            self.oldest_event_rv = self.events[0].rv
        self.events.append(event)
        self.changed.notify_all()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.changed.notify_all()
