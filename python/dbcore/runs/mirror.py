"""Run directories at `s3://bucket/prefix`: a local mirror, kept in step with the bucket.

A command given an `s3://` run works in a mirror of it, `DBCORE_MIRROR/s3/bucket/prefix` (default
`~/.cache/dbcore/mirror`): on entry every object of the run is downloaded (those already there, of
the same size and time, are kept), and each file the command writes is uploaded as soon as it is
complete: a checkpoint's tensors first and its JSON last (the JSON names the tensors' sha256, so a
reader never takes a half-written checkpoint for a whole one), `run.json` once, and the metrics of
each model as `metrics/NAME.jsonl` (blocks trained at once on different machines never write one
object). On download the metrics objects are joined into the mirror's `metrics.jsonl`.

Credentials, region and endpoint come from the standard AWS environment variables (including
`AWS_ENDPOINT_URL`), through s3fs: `pip install 'dbcore[s3]'`. Stores at `s3://` are read and
written by the Rust store directly (`dbcore.data.store`).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dbcore.data.location import is_url, s3_filesystem, s3_reason
from dbcore.errors import RunError

METRICS = "metrics.jsonl"  # a run's metrics; in the bucket, one object per model:
METRICS_PREFIX = "metrics/"  # metrics/NAME.jsonl

_active: dict[Path, Mirror] = {}  # local mirror -> its run, while a command works in it
F = TypeVar("F", bound=Callable[..., Any])


def _error(message: str) -> Exception:
    return RunError(message)


def _metrics(local: Path) -> Path:
    return local / METRICS


def _filesystem() -> Any:
    return s3_filesystem(RunError, "runs")


def mirror_root() -> Path:
    return Path(os.environ.get("DBCORE_MIRROR", Path.home() / ".cache" / "dbcore" / "mirror"))


class Mirror:
    """The local copy of the run at `url` (see the module docs)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.key = self.url.removeprefix("s3://")
        if "/" not in self.key or not self.key.split("/", 1)[1]:
            raise _error(f"{url}: a run needs a prefix inside its bucket (s3://bucket/run)")
        self.local = mirror_root() / "s3" / self.key
        self.fs = _filesystem()

    def pull(self, keep: Callable[[str], bool] | None = None) -> None:
        """Download the run's objects that the mirror lacks or holds older copies of (with `keep`,
        those whose path in the run it keeps)."""
        self.local.mkdir(parents=True, exist_ok=True)
        try:
            objects = self.fs.find(self.key, detail=True)
        except Exception as exc:  # OSError, or s3fs/botocore's own types
            raise _error(f"{self.url}: cannot list the run ({s3_reason(exc)})") from None
        metrics = []
        for key, info in sorted(objects.items()):
            rel = key[len(self.key) + 1:]
            if info.get("type") == "directory" or not rel:
                continue
            if (keep is not None and not keep(rel)) or _is_lock(rel):
                continue
            try:
                if rel.startswith(METRICS_PREFIX):
                    metrics.append(self.fs.cat_file(key))
                else:
                    self._download(key, self.local / rel, info)
            except OSError as exc:
                raise _error(f"{self.url}: could not download {rel} ({s3_reason(exc)})") from None
        _replace(_metrics(self.local), b"".join(metrics))

    def _download(self, key: str, path: Path, info: dict) -> None:
        """The object `key` at `path`, unless a copy of its size and time is there already."""
        stamp = info["LastModified"].timestamp()
        if path.is_file() and path.stat().st_size == info["size"] and path.stat().st_mtime == stamp:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.download")
        self.fs.get_file(key, str(tmp))
        os.utime(tmp, (stamp, stamp))
        tmp.replace(path)

    def push(self, path: Path) -> None:
        """Upload the complete file `path` of the mirror to its object."""
        rel = path.relative_to(self.local).as_posix()
        self._put(path, rel)
        stamp = self.fs.info(f"{self.key}/{rel}")["LastModified"].timestamp()
        os.utime(path, (stamp, stamp))

    def push_metrics(self, name: str) -> None:
        """Upload the mirror's metrics lines of model `name` as `metrics/NAME.jsonl`."""
        lines = [line for line in _metrics(self.local).read_text().splitlines(keepends=True)
                 if line.strip() and json.loads(line).get("name") == name]
        try:
            self.fs.pipe_file(f"{self.key}/{METRICS_PREFIX}{name}.jsonl", "".join(lines).encode())
        except OSError as exc:
            raise _error(f"{self.url}: could not upload the metrics of {name} ({s3_reason(exc)})") from None

    def _put(self, path: Path, rel: str) -> None:
        try:
            self.fs.put_file(str(path), f"{self.key}/{rel}")
        except OSError as exc:
            raise _error(f"{self.url}: could not upload {rel} ({s3_reason(exc)}); the local copy is in "
                         f"{self.local}") from None


def _is_lock(rel: str) -> bool:
    """A writer's lock object (`.NAME.lock`, see `dbcore.data.store.writer_lock`): never mirrored."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(".lock")


def url_of(path: Path) -> str | None:
    """The `s3://` URL of `path` when it lies in the mirror of a run a command works on."""
    mirror = _mirror_of(Path(path))
    if mirror is None:
        return None
    rel = Path(path).relative_to(mirror.local).as_posix()
    return mirror.url if rel == "." else f"{mirror.url}/{rel}"


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@contextmanager
def local_run(run: str | Path, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """The run's directory on this machine: `run` itself, or the mirror of an `s3://` run (with
    `keep`, of the objects it keeps: see `Mirror.pull`)."""
    if not is_url(run):
        yield Path(run)
        return
    mirror = Mirror(str(run))
    mirror.pull(keep)
    outer = _active.get(mirror.local)
    _active[mirror.local] = mirror
    try:
        yield mirror.local
    finally:
        if outer is None:
            _active.pop(mirror.local, None)


def mirrored(arg: str = "run",
             needs: Callable[[dict[str, Any]], Callable[[str], bool] | None] | None = None
             ) -> Callable[[F], F]:
    """Decorate a function taking a run directory as `arg`: an `s3://` run is replaced by its
    local mirror for the call (see `local_run`). `needs(arguments)`: which of the run's objects
    the call needs (a `keep` predicate, None: all), from its bound arguments."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            if not is_url(bound.arguments.get(arg)):
                return fn(*args, **kwargs)
            bound.apply_defaults()
            keep = needs(bound.arguments) if needs is not None else None
            with local_run(bound.arguments[arg], keep) as local:
                bound.arguments[arg] = local
                return fn(*bound.args, **bound.kwargs)

        return call  # type: ignore[return-value]

    return wrap


def _mirror_of(path: Path) -> Mirror | None:
    for local, mirror in _active.items():
        if path == local or local in path.parents:
            return mirror
    return None


def published(*paths: Path) -> None:
    """The files `paths` are complete: upload them, in this order, if they belong to a mirror."""
    for path in paths:
        mirror = _mirror_of(Path(path))
        if mirror is not None:
            mirror.push(Path(path))


def metrics_logged(run: Path, name: str) -> None:
    """Lines of model `name` were appended to the run's metrics: upload them if mirrored."""
    mirror = _mirror_of(Path(run))
    if mirror is not None:
        mirror.push_metrics(name)
