"""What the ``shimmy`` commands share to read their arguments: byte sizes, ring capacities, the
``--daemon`` option and the client it names, the ``--delimiter`` callback.

Argument parsing only: nothing here runs a command, prints, or opens a channel.
"""

from __future__ import annotations

import click

from shimmy import cli_io

MiB = 1 << 20


class Size(click.ParamType):
    """A byte count: ``65536``, ``64K``/``64KiB``, ``4M``/``4MiB``, ``1G``/``1GiB``."""

    name = "size"
    _units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    _examples = "K, M, G: 64K, 4MiB"   # said in the refusal of a value that is not a size

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        unit = text[-1:] if text[-1:] in self._units else ""
        number = text[:len(text) - len(unit)]
        if not number.isdigit():
            self.fail(f"{value!r} is not a size (bytes, or with {self._examples})", param, ctx)
        return int(number) * self._units[unit]


class RingCapacity(Size):
    """A ring capacity: a power of two within the ring's limits."""

    def __init__(self, check):
        self.check = check

    def convert(self, value, param, ctx):
        n = super().convert(value, param, ctx)
        try:
            self.check(n)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return n


def daemon_option(f):
    return click.option("--daemon", "daemon_path", metavar="PATH",
                        help="daemon control socket (default: $SHIMMY_DAEMON, else "
                             "/run/shimmy/shimmyd.sock)")(f)


def daemon_client(daemon_path: str | None):
    from shimmy.sdk.client import get_client
    return get_client(daemon_path)


def parse_delimiter(ctx: click.Context, param: click.Parameter, value: str) -> bytes:
    try:
        return cli_io.parse_delimiter(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
