"""Per-tenant quotas: what one container (or, outside containers, one uid) may hold at once.

A tenant is ``container:<id>`` when the daemon identifies the client's container (see
:mod:`.identity`), else ``uid:<n>``: root processes in different containers are different
tenants, host processes of one uid are one.  Usage is counted from the daemon's own books when a
request needs it (no separate counters to drift), and every refusal is
:class:`~shimmy.errors.LimitExceeded` naming the tenant, the setting and its value.
"""

from __future__ import annotations

from shimmy.errors import LimitExceeded

from . import identity
from .config import Settings


def tenant(uid: int | None, pid: int | None) -> str:
    """The quota account of a process: its container when known, else its uid."""
    cid = identity.container_id_of_pid(pid) if pid else None
    if cid is not None:
        return f"container:{cid[:12]}"
    return f"uid:{uid if uid is not None else '?'}"


class Quotas:
    def __init__(self, settings: Settings):
        self.settings = settings

    def check(self, what: str, who: str, used: int, more: int = 1) -> None:
        """Refuse when ``used + more`` exceeds the ``quota_<what>`` setting."""
        limit = getattr(self.settings, f"quota_{what}")
        if used + more > limit:
            unit = " bytes" if what == "shm_bytes" else ""
            raise LimitExceeded(f"{who} holds {used}{unit} {what.replace('_', ' ')}; asking "
                                f"for {more}{unit} more exceeds quota_{what}={limit}{unit} "
                                f"(per container, or per uid outside containers)")
