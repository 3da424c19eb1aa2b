"""Channel and stream names.

A name is 1-200 characters: segments of ``[A-Za-z0-9._-]`` joined by ``/``, no empty segment and
no segment that is ``.`` or ``..``.  Names are global across peered nodes.  POSIX shared-memory
objects have a flat namespace, so the daemon never puts a user's name in a path: it names each
object by a short hash of the name (see :func:`object_token`).
"""

from __future__ import annotations

import hashlib
import re

from shimmy.errors import InvalidName

MAX_NAME_LENGTH = 200
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+\Z")
RULE = "1-200 characters: segments of [A-Za-z0-9._-] joined by '/', no empty, '.' or '..' segment"


def validate_name(name: object) -> str:
    """Return ``name`` if it follows the naming rule, else raise :class:`InvalidName` saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"channel name must be a str, got {type(name).__name__}; rule: {RULE}")
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise InvalidName(f"channel name has {len(name)} characters; rule: {RULE}")
    for segment in name.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise InvalidName(f"channel name {name!r} has a bad segment {segment!r}; rule: {RULE}")
    return name


def object_token(name: str) -> str:
    """A short, filesystem-safe token identifying ``name`` in shared-memory object names."""
    return hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
