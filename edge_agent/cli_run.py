"""Running a click command line the fedfleet way, for `fedfleet` and `fedfleet-agent` alike.

- usage errors (unknown command or option, a bad value) print one line, `PROG CMD: error: ...`, and exit 2;
- `FedfleetError` (bad input found by the command) prints one line and exits 2, never a traceback;
- a module that an optional extra brings (torch on a bare install) names the extra to install, exit 1;
- `--help` and `--version` exit 0; Ctrl-C exits 130.

Nothing here exits the process (click runs with `standalone_mode=False`, and a pass-through module's
`SystemExit` becomes its code), so in-process callers, tests among them, get a return code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

import click

from fedfleet.edge_agent.errors import FedfleetError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# which extra brings a package that a command may import (a bare `pip install fedfleet` is the agent's set)
EXTRA_OF_PACKAGE = {"torch": "coordinator", "onnx": "coordinator", "onnxscript": "coordinator",
                    "matplotlib": "coordinator", "amqtt": "coordinator", "rich": "coordinator",
                    "scipy": "coordinator", "ai_edge_litert": "tflite", "flatbuffers": "tflite",
                    "sktime": "examples"}


class ArgParser(argparse.ArgumentParser):
    """The parser of a pass-through command (a benchmark, `report`, `provision`, ...): argparse with the CLI's
    conventions, no abbreviated options and a usage error in one line (exit 2)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def pass_through(name: str, help_line: str, run: Callable[[list[str]], int | None]) -> click.Command:
    """A command whose module parses its own arguments (`PROG NAME --help` is that module's help)."""

    def invoke(args: tuple[str, ...]) -> int:
        return int(run(list(args)) or 0)

    return click.Command(name, callback=invoke, help=help_line, short_help=help_line, add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)])


def version_option(program: str) -> Callable:
    """`--version`: the installed distribution's version."""

    def show(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(f"{program} {package_version()}")
            ctx.exit(0)

    return click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=show,
                        help="print the version and exit")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedfleet")
    except PackageNotFoundError:  # a checkout used without installing it
        return "unknown (not installed)"


def missing_package(exc: ModuleNotFoundError, where: str) -> str | None:
    """A one-line message for a package an optional extra brings, or None for any other missing module."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_PACKAGE.get(top)
    if extra is None:
        return None
    return (f"{where}: error: this needs the package {top!r}, which is not installed; install fedfleet with "
            f"the [{extra}] extra: pip install 'fedfleet[{extra}]'")


def run(command: click.Command, argv: list[str], program: str) -> int:
    """Run `command` on `argv` and return the exit code (see the module docstring)."""
    argv = list(argv)
    if not argv and isinstance(command, click.Group) and not command.invoke_without_command:
        argv = ["--help"]  # a bare `fedfleet`: its help, exit 0
    where = f"{program} {argv[0]}" if argv and isinstance(command, click.Group) and not argv[0].startswith("-") \
        else program
    try:
        result = command.main(args=argv, prog_name=program, standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else program
        print(f"{path}: error: {exc.format_message()} (see '{path} --help')", file=sys.stderr)
        return 2
    except click.ClickException as exc:
        print(f"{where}: error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        return 130
    except FedfleetError as exc:
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, ConnectionError) as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return 1
    except SystemExit as exc:  # a pass-through parser's --help or usage error, or a module's sys.exit
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(f"{where}: error: {exc.code}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        message = missing_package(exc, where)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    return int(result or 0)
