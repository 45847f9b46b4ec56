"""The folder name of a sweep job: its overrides, flat, short and readable, and nothing else.

Hydra's own `override_dirname` keeps a path value's slashes, so `backbone.weights=/a/b/c.safetensors`
made nested folders with components near the file-system limit, and the job number that prefixed it
made a folder depend on the job's position, so adding `seed=2` to a finished `seed=0,1` sweep re-ran
every job. Here a job's name is its overrides sorted by key, a path shortened to its file name and a
short hash of the whole path, the name capped with a hash of the whole; the same overrides always
give the same folder. The full overrides stay in the job's `.hydra/overrides.yaml`.
"""
from __future__ import annotations

import hashlib
import re
from typing import Iterable

#: longest job folder name (file systems allow 255 bytes; this leaves room to read it)
MAX_NAME = 120
#: characters kept in a name; anything else (spaces, quotes, slashes) becomes "_"
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-\[\]{}:@%]")


def digest(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def short_value(value: str) -> str:
    """A path becomes its file name plus a hash of the whole path (two files of one name stay apart)."""
    if "/" in value or "\\" in value:
        name = re.split(r"[/\\]", value.rstrip("/\\"))[-1]
        return f"{name}-{digest(value, 6)}" if name else digest(value, 6)
    return value


def job_name(overrides: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """The folder name of the job run with `overrides` (KEY=VALUE), leaving out keys in `exclude`."""
    excluded = set(exclude)
    parts = []
    for override in sorted(overrides, key=lambda o: o.lstrip("+~").partition("=")[0]):
        key, _, value = override.partition("=")
        if key.lstrip("+~") in excluded:
            continue
        parts.append(UNSAFE.sub("_", f"{key}={short_value(value)}"))
    name = ",".join(parts) or "defaults"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 9]}~{digest(name)}"
    return name
