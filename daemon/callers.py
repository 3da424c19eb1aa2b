"""Who is asking, and what they may do: the client a request speaks for (its id and secret token),
its container label policy, the caller the kernel reports for its session socket, the access
check on both layers, and the books that quotas count (who owns each channel, which tenant each
client is).

It must never take a client's word for who it is (only the kernel's peer credentials and the
token the daemon issued), and it decides nothing about channels itself: it answers yes or raises.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from shimmy.errors import InvalidArgument, PermissionDenied

from . import containers, identity, label_policy
from .access import Ownership
from .dispatch import ID_MAX, field
from .identity import Caller
from .sessions import Client

if TYPE_CHECKING:
    from .server import Daemon


class Callers:
    def __init__(self, d: Daemon):
        self.d = d
        # Identity and access (docs/containers.md): peer credentials -> cgroup -> labels.
        self.labels = containers.DockerLabelSource()
        self.owners: dict[str, tuple[object, Ownership]] = {}   # name -> (record, ownership)
        self.tenants: dict[int, str] = {}        # client id -> quota account, orphans included

    def client(self, req: dict) -> Client:
        """The client a request speaks for.  Client ids are small integers anyone could guess,
        so a request must also carry the client's secret token from ``hello``: a process cannot
        act (and be judged by the access policy) as another."""
        cid = field(req, "client", int, lo=1, hi=ID_MAX)
        client = self.d.sessions.clients.get(cid)
        if client is None:
            raise InvalidArgument(f"unknown client {cid}; say hello first")
        token = req.get("token")
        if not isinstance(token, str) or not token.isascii() or \
                not secrets.compare_digest(token, client.token):
            raise PermissionDenied(f"request for client {cid} without that client's token")
        return client

    def policy(self, client: Client) -> label_policy.LabelPolicy:
        policy = client.policy
        if policy is None:
            if client.sock is None:
                self.d.sessions.settle()
            policy = label_policy.policy_for_pid(client.pid, self.labels,
                                                 default_open=self.d.settings.access != "closed")
            client.container = policy.container_id
            if client.sock is not None:
                client.policy = policy  # identified for good; before that, ask again next time
        assert isinstance(policy, label_policy.LabelPolicy)
        return policy

    def caller(self, client: Client) -> Caller:
        """Who the client is for the access policy: the uid, groups and container the kernel
        reports for its session socket (never what it claims)."""
        if isinstance(client.caller, Caller):
            return client.caller
        self.policy(client)  # identifies the container
        if client.uid is None or client.gid is None:
            raise PermissionDenied(
                f"client {client.id} has not presented its session token on "
                f"{self.d.sessions.path}; a client connects its session (spec/control.md) before "
                f"any channel request, which is how the daemon learns its uid")
        labels: dict = {}
        if client.container is not None:
            try:
                labels = self.labels.labels(client.container) or {}
            except Exception:  # the label source must not take a request down
                labels = {}
        caller = Caller(client.uid, client.gid, identity.supplementary_groups(client.pid),
                        client.pid, client.container, tuple(sorted(labels.items())))
        client.caller = caller
        return caller

    def authorize(self, client: Client, op: str, name: str, owner: Ownership | None,
                  kind: str = "channel") -> None:
        """Both layers: container labels (label_policy) and ownership (access); ``kind`` ("channel"
        or "stream") is what refusals call the object."""
        policy = self.policy(client)
        if op in ("publish", "subscribe"):
            policy.check(op, name)
        elif op == "open":
            policy.check_open(name)
        self.d.access.check(self.caller(client), op, name, owner, kind)

    def owner(self, name: str) -> Ownership | None:
        """The ownership of live channel ``name`` (None: made for no client, e.g. a replica)."""
        entry = self.owners.get(name)
        if entry is None:
            return None
        if entry[0] is not self.d.registry.channels.get(name):
            del self.owners[name]   # the channel it was recorded for is gone
            return None
        return entry[1]

    def tenant_usage(self, who: str) -> tuple[int, int]:
        """(channels and streams, bytes of shared memory) tenant ``who`` created and holds."""
        count = size = 0
        for name in list(self.owners):
            own = self.owner(name)
            if own is not None and own.principal == who:
                count += not own.member   # a publisher's member ring is bytes, not a channel
                size += own.size
        for st in self.d.streams.owned_by(who):
            count += 1
            size += st
        return count, size

    def check_create_quota(self, who: str, size: int) -> None:
        count, used = self.tenant_usage(who)
        self.d.quotas.check("channels", who, count)
        self.d.quotas.check("shm_bytes", who, used, size)

    def visible(self, req: dict):
        """The caller of a list/stat request, or None when it may see everything."""
        if self.d.settings.access == "open":
            return None
        if req.get("client") is None:
            return False   # anonymous: no channel details
        caller = self.caller(self.client(req))
        return None if caller.uid == 0 else caller
