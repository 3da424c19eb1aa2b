"""Parsers for setting values shared by the settings (:mod:`.config`) and the rule grammar
(:mod:`.rules`) and the metrics exporter (:mod:`.metrics`): octal modes, users and groups by name
or number, listen addresses.  Each raises :class:`SettingError` (``parse_listen``: ValueError)
naming the setting and what it wanted."""

from __future__ import annotations

import grp
import pwd


class SettingError(ValueError):
    """A setting is missing, of the wrong type or out of range; the message names it."""


def parse_mode(name: str, value: str) -> int:
    """An octal mode string such as ``"0660"``; refuses anything but permission bits."""
    try:
        mode = int(value, 8)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be an octal mode such as '0660', got {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise SettingError(f"{name} must be permission bits 0000..0777, got {value!r}")
    return mode


def resolve_group(name: str, value: str) -> int:
    """A group given by name or number, as a gid."""
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise SettingError(f"{name}: no group named {value!r}") from None


def resolve_user(name: str, value: str) -> int:
    """A user given by name or number, as a uid."""
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise SettingError(f"{name}: no user named {value!r}") from None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ValueError naming the rule otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_listen {text!r} must be HOST:PORT (port 0..65535), "
                         f"e.g. 127.0.0.1:9464")
    return host.strip("[]"), int(port)
