"""Peer authentication: mutual HMAC-SHA256 challenge-response on a shared cluster key.

The key never crosses the wire.  Each side sends a fresh 32-byte nonce; each proves it holds the
key by a MAC over both nonces and both node names, with a role byte so a reflected answer is
useless::

    dialer   -> HELLO(magic, version, nonce_d, name_d)
    listener -> HELLO(magic, version, nonce_l, name_l)
                + HMAC(key, "L" nonce_d nonce_l name_d name_l)
    dialer   -> HMAC(key, "D" nonce_l nonce_d name_l name_d)        (after checking the listener)
    listener -> b"\\x01"                                               (after checking the dialer)

Every read is bounded in size and by ``peer_handshake_timeout``.  A failure raises
``PeerRefused`` with a ``reason`` the service counts (``auth``, ``protocol``).  TLS (optional)
wraps the socket before this handshake; the HMAC still runs inside it, so a TLS certificate alone
never admits a peer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import ssl
import struct

MAGIC = b"SHMYPEER"
VERSION = 1
HELLO = struct.Struct("<8sHH32s")   # magic, version, name length, nonce
MAC_LEN = 32
MAX_NAME = 255
MIN_KEY = 16


class PeerRefused(Exception):
    """A peer failed the handshake; ``reason`` is 'auth', 'protocol', or 'self' (the other end
    is this very daemon, as when a discovered address turns out to be our own)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_key(path: str) -> bytes:
    with open(path, "rb") as fh:
        key = fh.read().strip()
    if len(key) < MIN_KEY:
        raise ValueError(f"cluster key file {path} holds {len(key)} bytes; need at least {MIN_KEY}")
    return key


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise PeerRefused("protocol", f"connection closed after {got} of {n} handshake bytes")
        got += k
    return bytes(buf)


def _hello(name: bytes, nonce: bytes) -> bytes:
    return HELLO.pack(MAGIC, VERSION, len(name), nonce) + name


def _read_hello(sock: socket.socket) -> tuple[bytes, bytes]:
    magic, version, n, nonce = HELLO.unpack(recv_exact(sock, HELLO.size))
    if magic != MAGIC:
        raise PeerRefused("protocol", f"bad magic {magic[:8]!r} (not a shimmy peer)")
    if version != VERSION:
        raise PeerRefused("protocol", f"peer protocol version {version}, we speak {VERSION}")
    if n == 0 or n > MAX_NAME:
        raise PeerRefused("protocol", f"peer announced a node name of {n} bytes (1..{MAX_NAME})")
    name = recv_exact(sock, n)
    return name, nonce


def _mac(key: bytes, role: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, role + b"".join(parts), hashlib.sha256).digest()


def dial_handshake(sock: socket.socket, key: bytes, node: str) -> str:
    """Authenticate as the dialing side; return the listener's node name."""
    me = node.encode()
    nonce_d = secrets.token_bytes(32)
    sock.sendall(_hello(me, nonce_d))
    name_l, nonce_l = _read_hello(sock)
    mac_l = recv_exact(sock, MAC_LEN)
    if not hmac.compare_digest(mac_l, _mac(key, b"L", nonce_d, nonce_l, me, name_l)):
        raise PeerRefused("auth", f"listener {name_l!r} did not prove the cluster key")
    sock.sendall(_mac(key, b"D", nonce_l, nonce_d, name_l, me))
    if recv_exact(sock, 1) != b"\x01":
        raise PeerRefused("auth", f"listener {name_l!r} refused our proof of the cluster key")
    return name_l.decode(errors="replace")


def accept_handshake(sock: socket.socket, key: bytes, node: str) -> str:
    """Authenticate as the listening side; return the dialer's node name."""
    me = node.encode()
    name_d, nonce_d = _read_hello(sock)
    nonce_l = secrets.token_bytes(32)
    sock.sendall(_hello(me, nonce_l) + _mac(key, b"L", nonce_d, nonce_l, name_d, me))
    try:
        mac_d = recv_exact(sock, MAC_LEN)
    except PeerRefused:
        # The dialer hung up instead of answering: it could not verify our MAC (other key).
        raise PeerRefused("auth", f"dialer {name_d!r} hung up after our proof (different "
                                  f"cluster key?)") from None
    if not hmac.compare_digest(mac_d, _mac(key, b"D", nonce_l, nonce_d, me, name_d)):
        raise PeerRefused("auth", f"dialer {name_d!r} did not prove the cluster key")
    sock.sendall(b"\x01")
    return name_d.decode(errors="replace")


def tls_contexts(cert: str, key: str,
                 ca: str) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(server, client) TLS contexts, or (None, None) when TLS is off."""
    if not cert:
        return None, None
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key or None)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # peers are addressed by IP; identity comes from the CA + HMAC
    client.load_cert_chain(cert, key or None)
    if ca:
        for ctx in (server, client):
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        client.verify_mode = ssl.CERT_NONE
    return server, client


def random_key_file(path: str) -> None:
    """Write a fresh random cluster key (mode 0600); for tests and first setup."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_hex(32).encode())
