"""The ``shimmy`` command: daemon | pub | sub | cat | ls | stat | top | rm | health | bench | demo
| record | replay | export.

Exit codes: 0 success, 1 a runtime failure (daemon unreachable, refused operation, timeout),
2 a usage error (bad option, bad value, bad name), 130 interrupted.  Errors are one line on
stderr naming what was wrong; no traceback reaches the user.  A closed stdout (``shimmy ls |
head -1``) ends the command quietly.  The commands parse, call the SDK or the daemon's control
requests, and print: they must never touch a ring's words themselves.

This file is the group, the ``daemon``, ``bench`` and ``demo`` commands and the entry point
(exit codes, errors); the other commands live in ``cli_data`` (pub, sub, cat), ``cli_inspect``
(ls, stat, top, rm, health) and ``cli_record`` (record, replay, export), their arguments' types
in ``cli_args``.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import click

import shimmy
from shimmy import cli_data, cli_inspect, cli_record, ring
from shimmy.bench.runner import bench
from shimmy.errors import InvalidArgument, InvalidName, ShimmyError

# Argument errors found by the SDK or the daemon count as usage errors (exit 2).
USAGE_ERRORS = (InvalidName, InvalidArgument)


class _PipeClosed(Exception):
    """Whoever read our stdout stopped reading (``| head``): the command ends quietly."""


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            if isinstance(exc, ShimmyError):  # StreamBroken: a stream's writer died
                raise
            raise _PipeClosed() from None


# Which per-message ring paths this install runs (shimmy/_ringcore.c or the Python versions).
_RING_PATHS = ("C" if ring.ACCELERATED else
               "Python: set by SHIMMY_PURE_PYTHON" if os.environ.get("SHIMMY_PURE_PYTHON") else
               "Python: the C extension was not built, see the README")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(shimmy.__version__, "-V", "--version", prog_name="shimmy",
                      message="%(prog)s %(version)s (ring paths: " + _RING_PATHS + ")")
def cli() -> None:
    """Shared-memory channels and streams on one node, mirrored across nodes."""


# -- daemon: one flag per Settings field (daemon/config.py is the single source) -------------------
_FLAG_ALIASES = {"peers": ["--peer"]}   # the singular spelling the docs use


def _settings_params() -> list[click.Parameter]:
    from shimmy.daemon.config import Settings
    params: list[click.Parameter] = [
        click.Option(["config", "--config"], metavar="FILE", type=click.Path(dir_okay=False),
                     help="TOML settings file (docs/daemon.md); flags override it")]
    for f in dataclasses.fields(Settings):
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        help_text = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        decls = [f.name, flag, *_FLAG_ALIASES.get(f.name, [])]
        if isinstance(default, bool):
            params.append(click.Option([f.name, f"{flag}/--no-{flag[2:]}"], default=None,
                                       help=f"{help_text} (default: {default})"))
        elif isinstance(default, list):
            params.append(click.Option(decls, multiple=True, metavar="VALUE",
                                       help=f"{help_text}"))
        else:
            choices = f.metadata.get("choices")
            kind = (click.Choice(choices) if choices
                    else {int: int, float: float}.get(type(default), str))
            shown = default if default != "" else "none"
            params.append(click.Option(decls, type=kind, default=None,
                                       help=f"{help_text} (default: {shown})"))
    return params


def _run_daemon(config: str | None, **overrides) -> int:
    from shimmy.daemon import config as config_mod
    from shimmy.daemon import server
    overrides = {k: (list(v) if v else None) if isinstance(v, tuple) else v
                 for k, v in overrides.items()}
    try:
        settings = config_mod.load(config, **overrides)
    except (OSError, ValueError, TypeError) as exc:
        click.echo(f"shimmy daemon: bad settings: {exc}", err=True)
        return 2
    server.run(settings)
    return 0


cli.add_command(click.Command(
    "daemon", callback=_run_daemon, params=_settings_params(),
    help="Run the node daemon.  Every setting of docs/daemon.md is a flag here; flags override "
         "--config.", short_help="run the node daemon"))


cli.add_command(bench)   # shimmy/bench/runner.py


@cli.command(short_help="embedded daemon + publisher + 2 subscribers, vs ZeroMQ")
@click.option("--seconds", type=click.FloatRange(min=0.1, max=3600), default=3.0,
              show_default=True, help="how long each workload runs")
@click.option("--size", type=click.IntRange(min=1, max=ring.max_message_size(ring.DEFAULT_CAPACITY)
                                            ),
              default=256, show_default=True, metavar="BYTES", help="message size")
def demo(seconds: float, size: int) -> None:
    """Start a private daemon, run one publisher and two subscriber processes with live
    progress, then the same workload over ZeroMQ ipc; everything is removed at the end."""
    from shimmy.demo import run_demo
    sys.exit(run_demo(seconds=seconds, size=size))


# -- the commands of shimmy/cli_data.py, cli_inspect.py and cli_record.py ------------------------
for _command in (*cli_data.COMMANDS, *cli_inspect.COMMANDS, *cli_record.COMMANDS):
    cli.add_command(_command)


# -- entry point -----------------------------------------------------------------------------------
def _quiet_stdout() -> None:
    """stdout's reader went away: point stdout at /dev/null so the final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _fail(message: str) -> None:
    try:
        click.echo(message, err=True)
    except OSError:
        pass  # stderr is gone too


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    code = 0
    stdout = sys.stdout
    try:
        result = cli.main(args=argv, prog_name="shimmy", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            _fail(exc.code)
        if sys.stdout is not stdout:
            code = 0  # click met a closed stdout (printing help) and wrapped it: not an error
    except USAGE_ERRORS as exc:
        _fail(f"shimmy: {type(exc).__name__}: {exc}")
        code = 2
    except ShimmyError as exc:
        _fail(f"shimmy: {type(exc).__name__}: {exc}")
        code = 1
    except _PipeClosed:
        _quiet_stdout()
        code = 0
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"shimmy: {exc.strerror or exc}{where}")
        code = 1
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get("SHIMMY_DEBUG"):
            raise
        _fail(f"shimmy: internal error: {type(exc).__name__}: {exc} (SHIMMY_DEBUG=1 shows the "
              f"traceback)")
        code = 1
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _quiet_stdout()
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
