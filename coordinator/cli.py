"""`fedfleet`: the coordinator and tools command line (`fedfleet --help`, `fedfleet COMMAND --help`).

Built on click: it is small (one pure-Python package, no dependencies of its own), it is already what typer
sits on, and the same library serves `fedfleet-agent` on a device, where every megabyte counts. Each command
declares only its own options, every option has a help line, options are never abbreviated, and
`--version` and "no such command" come with it.

Commands that live in other modules keep their own parsers and get their arguments as given ("pass-through"):
`report`, `export`, `provision` and `generate` in the coordinator's layers, and the commands of the tools layer
(`bench`, `emulate`), which this module finds through the `fedfleet.commands` entry points without importing
upward.

Errors in input (config files, options) print one clear line and exit 2, never a traceback; a command that
needs a package this install lacks says which and how to install it (exit 1).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from fedfleet.edge_agent.cli_run import CONTEXT, pass_through, run, version_option
from fedfleet.edge_agent.errors import FedfleetError

PLUGINS = ("bench", "emulate")  # commands of fedfleet.tools, found through entry points
PASS_THROUGH = {"report": "fedfleet.coordinator.records.report", "provision": "fedfleet.coordinator.job.provision",
                "generate": "fedfleet.coordinator.mtvg.generate", "tls": "fedfleet.coordinator.tls",
                "export": "fedfleet.coordinator.records.export"}


def summary(module: str) -> str:
    """The first sentence of a module's docstring, without a leading "`fedfleet NAME`: " or "Benchmark: ",
    read from its source without running it (no heavy imports for a help line)."""
    try:
        spec = importlib.util.find_spec(module)
        text = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else None
    except (ImportError, OSError, SyntaxError, ValueError):
        text = None
    if not text:
        return ""
    first = " ".join(text.split("\n\n")[0].split())
    if first.startswith("`") and "`: " in first:
        first = first.split("`: ", 1)[1]
    for prefix in ("Benchmark: ", "Benchmark of "):
        if first.startswith(prefix):
            first = first[len(prefix):]
    end = first.find(". ")
    first = first if end < 0 else first[:end]
    if len(first) > 90 and " (" in first:  # one line in a listing: the details stay in the module
        first = first[:first.index(" (")]
    first = first.rstrip(".")
    return first[:1].upper() + first[1:]


# ---------------------------------------------------------------- options shared by the job commands
def _options(*decorators: Callable) -> Callable:
    def apply(f: Callable) -> Callable:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


SHARD_OPTIONS = _options(
    click.option("--config", metavar="JOB.toml", help="the job file (its fields: the docs' job file reference); "
                 "options given here override it"),
    click.option("--method", help="the training method: fedavg (default), fedzo, fzoos, fot, ... (a bad name "
                 "lists them all)"),
    click.option("--agents", type=int, help="number of agents (default 10)"),
    click.option("--alpha", type=float, help="Dirichlet label skew of the agents' shards (0 = IID, the default)"),
    click.option("--mode", type=click.Choice(["transfer", "full", "lora"]),
                 help="what agents train: the head on a frozen int8 backbone (transfer, default), the whole "
                 "model (full) or LoRA adapters (lora)"),
    click.option("--dataset", type=click.Choice(["digits", "mnist"]), help="sklearn's 8x8 digits (default) or "
                 "the MNIST 5k images (full mode only)"),
    click.option("--task", help="classification (default) or moving-digits-diffusion (fedavg trains a video "
                 "denoiser)"),
    click.option("--seed", type=int, help="seed of the shards, the model's initialisation and the sampling"),
    click.option("--shard-mode", "shard_mode", type=click.Choice(["partition", "sampled"]),
                 help="partition: disjoint shards (default); sampled: each agent draws its own shard, with "
                 "replacement across agents (any fleet size)"),
    click.option("--shard-size", "shard_size", type=int, help="sampled shards: samples per agent (default: the "
                 "training split over the agents, at least 10)"),
)

RUN_OPTIONS = _options(
    click.option("--rounds", type=int, help="number of rounds (default 5)"),
    click.option("--per-round", "per_round", type=int, help="agents asked per round (default: all)"),
    click.option("--over-select", "over_select", type=float, help="over-selection for dropouts: task "
                 "ceil(per_round * (1 + X)) agents and aggregate the first per_round results (0 <= X <= 1)"),
    click.option("--hidden", type=int, help="hidden width of the MLP head"),
    click.option("--runtime", type=click.Choice(["onnxruntime", "litert"]), help="the agents' inference runtime "
                 "(default onnxruntime)"),
    click.option("--eval-every", "eval_every", type=int, help="moving-digits-diffusion: evaluate every N rounds"),
    click.option("--deadline", "deadline_s", type=float, help="seconds each round phase waits for agents"),
    click.option("--quorum", type=float, help="fraction of the round's agents whose answers close the round early "
                 "(0 < q <= 1)"),
    click.option("--fleet", help="fleet name: the MQTT topic prefix agents join (default demo)"),
    click.option("--uplink", help="uplink codec preset: none, zstd, fedzip (z 0.03, k 3, e4, error feedback), "
                 "or JSON such as '{\"name\":\"fedzip\",\"z\":0.01}' (unset keys take the codec's defaults)"),
    click.option("--downlink", type=click.Choice(["none", "zstd", "fedzip"]),
                 help="task codec: fedzip (default: the change since each agent's replica), none (dense) or zstd "
                 "(lossless)"),
    click.option("--run-dir", "run_dir", help="where the ledger, checkpoints and summary go (default "
                 "runs/<run id>)"),
    click.option("--json", "json_out", metavar="PATH", help="write the summary JSON here too"),
    click.option("--metrics-port", "metrics_port", type=int, help="serve live Prometheus metrics on "
                 "127.0.0.1:PORT (0: any free port)"),
    click.option("--report", type=click.Choice(["background", "now", "none"]), default="background",
                 show_default=True, help="render the HTML/PNG report in its own process after the summary, in "
                 "this one, or not at all"),
    click.option("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint "
                 "(give the job's own options; only --rounds and --deadline may change)"),
)

JOB_FIELDS = ("method", "rounds", "agents", "per_round", "over_select", "alpha", "shard_mode", "shard_size", "mode", "dataset", "hidden", "runtime", "seed",
              "deadline_s", "quorum", "fleet", "downlink", "task", "eval_every")


def _job_config(args: Any):  # noqa: ANN202
    """The job: --config (or the defaults) with the command line's options over it, checked."""
    from fedfleet.coordinator.job import config

    port = getattr(args, "metrics_port", None)
    if port is not None and not 0 <= port <= 65535:
        raise FedfleetError(f"--metrics-port must be a TCP port in 0..65535 (0: any free port), got {port}")

    cfg = config.load(args.config) if args.config else config.JobConfig()
    overrides = {k: getattr(args, k) for k in JOB_FIELDS if getattr(args, k, None) is not None}
    config.apply(cfg, overrides, "command line")
    uplink = getattr(args, "uplink", None)
    if uplink:
        try:
            spec = json.loads(uplink) if uplink.startswith("{") else config.uplink_preset(uplink)
        except json.JSONDecodeError as exc:
            raise FedfleetError(f"--uplink: not valid JSON ({exc})") from None
        cfg.uplink = config.check_codec(spec, "--uplink")
    return config.check_task(cfg)


def _run_dir(args: Any) -> str | None:
    """The run directory: --resume's, or --run-dir (they must agree when both are given)."""
    if args.resume and args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
        raise FedfleetError(f"--resume {args.resume} and --run-dir {args.run_dir} name different run directories")
    return args.resume or args.run_dir


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def _read_secret(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise FedfleetError(f"--secret-file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise FedfleetError(f"--secret-file {path}: the fleet secret must be at least 16 bytes")
    warn_if_readable(path, "--secret-file")
    return secret


def warn_if_readable(path: str, option: str) -> None:
    """A warning on stderr when a secret file may be read by its group or others (it should be 0600)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        print(f"fedfleet: warning: {option} {path} is readable by others (mode {mode & 0o777:04o}); "
              f"chmod 600 {path}", file=sys.stderr)


# ---------------------------------------------------------------- the group: built-in, pass-through and plugin commands
class Commands(click.Group):
    """The built-in commands, then the pass-through ones and the plugins, in the order of `ORDER`."""

    ORDER = ("demo", "serve", "keys", "tls", "provision", "shards", "broker", "report", "export", "generate",
             "emulate", "bench")

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands) | set(PASS_THROUGH) | {ep.name for ep in _plugins()}
        return [n for n in self.ORDER if n in names] + sorted(names - set(self.ORDER))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name in PASS_THROUGH:
            module = PASS_THROUGH[name]
            return pass_through(name, summary(module), lambda argv: importlib.import_module(module).main(argv))
        for ep in _plugins():
            if ep.name == name:
                return pass_through(name, summary(ep.value.split(":")[0]), lambda argv, ep=ep: ep.load()(argv))
        if name in PLUGINS:
            raise FedfleetError(f"command {name!r} is not installed (no 'fedfleet.commands' entry point); "
                                "reinstall fedfleet")
        return None


def _plugins() -> list[Any]:
    """Commands that a layer above the coordinator registers (entry points `fedfleet.commands`: the tools'
    `bench` and `emulate`); the coordinator never imports them by name."""
    from importlib.metadata import entry_points

    return list(entry_points(group="fedfleet.commands"))


@click.group(cls=Commands, context_settings=CONTEXT, help="Federated learning for fleets of Raspberry Pi and "
             "Jetson devices over MQTT: the coordinator's and the tools' commands.")
@version_option("fedfleet")
def cli() -> None:
    pass


@cli.command(context_settings=CONTEXT, short_help="A broker, the coordinator and its agents in one command")
@click.option("--broker", default="embedded", show_default=True,
              help="embedded, mosquitto, memory (in-process, no sockets) or mqtt://host:port")
@click.option("--quiet", is_flag=True, help="no progress view, only the summary JSON")
@SHARD_OPTIONS
@RUN_OPTIONS
def demo(**opts: Any) -> int:
    """A broker, the coordinator and the agents in one command; prints the summary JSON."""
    args = SimpleNamespace(**opts)
    cfg = _job_config(args)  # checked before the job's heavy imports
    run_dir = _run_dir(args)
    from fedfleet.coordinator.job.run import run_demo

    result = run_demo(cfg, broker=args.broker, run_dir=run_dir, quiet=args.quiet,
                      metrics_port=args.metrics_port, resume=bool(args.resume), report=args.report)
    _write_json(args.json_out, result.to_json())
    print(json.dumps(result.to_json()))
    return 0


@cli.command(context_settings=CONTEXT, short_help="Run the coordinator for agents on devices")
@click.option("--broker", required=True, help="the broker: mqtt://host:port or mqtts://host:port")
@click.option("--secret-file", "secret_file", required=True, metavar="FILE",
              help="the fleet secret (agents' keys derive from it; keep it off the devices)")
@click.option("--signing-key-file", "signing_key_file", required=True, metavar="FILE",
              help="the coordinator's Ed25519 signing key (`fedfleet keys --signing-key-file K --new`)")
@click.option("--roster", help="comma-separated agent ids (default: agent-00 .. agent-NN)")
@click.option("--wait", type=float, default=600.0, show_default=True, help="seconds to wait for a quorum of agents")
@click.option("--username", help="broker user (with a password file and ACL)")
@click.option("--password-file", "password_file", metavar="FILE",
              help="the broker password, in a file (never on the command line)")
@click.option("--ca-certs", "ca_certs", metavar="FILE", help="CA certificate file for an mqtts:// broker")
@SHARD_OPTIONS
@RUN_OPTIONS
def serve(**opts: Any) -> int:
    """Run the coordinator for agents on devices (`fedfleet-agent`)."""
    from fedfleet.coordinator.job.config import apply

    args = SimpleNamespace(**opts)
    cfg = _job_config(args)
    password = None
    for path, option in ((args.password_file, "--password-file"), (args.signing_key_file, "--signing-key-file")):
        if path:
            warn_if_readable(path, option)
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise FedfleetError(f"--password-file {args.password_file}: {exc.strerror}") from None
    if args.roster:
        apply(cfg, {"roster": [a.strip() for a in args.roster.split(",") if a.strip()]}, "--roster")
    run_dir = _run_dir(args)
    from fedfleet.coordinator.job.run import serve as serve_job
    from fedfleet.edge_agent.wire.signing import read_key_file

    result = serve_job(cfg, broker=args.broker, secret=_read_secret(args.secret_file),
                       signing_key=read_key_file(args.signing_key_file, "--signing-key-file"),
                       run_dir=run_dir, wait_s=args.wait, username=args.username, password=password,
                       ca_certs=args.ca_certs, metrics_port=args.metrics_port, resume=bool(args.resume),
                       report=args.report)
    _write_json(args.json_out, result.to_json())
    return 0


@cli.command(context_settings=CONTEXT, short_help="Make the fleet secret and signing key, or agents' keys")
@click.option("--secret-file", "secret_file", metavar="FILE",
              help="the fleet secret: print (or with --out, write) the key of each agent ID; with --new, make it")
@click.option("--signing-key-file", "signing_key_file", metavar="FILE",
              help="the coordinator's signing key file (coordinator.key), with --new or --public")
@click.option("--new", is_flag=True, help="create the fleet secret (--secret-file) and/or the signing key "
              "(--signing-key-file), each 0600 and never overwriting; prints the signing key's public key")
@click.option("--public", is_flag=True, help="print the signing key's public key (hex) for agents to pin")
@click.option("--out", metavar="DIR", help="with agent IDs: write DIR/<ID>.key (0600) for each instead of printing")
@click.argument("ids", nargs=-1, metavar="[ID]...")
def keys(secret_file: str | None, signing_key_file: str | None, new: bool, public: bool, out: str | None,
         ids: tuple[str, ...]) -> int:
    """Make the fleet secret and the coordinator's signing key, or print (write) each agent's key."""
    import os

    from fedfleet.coordinator.safe_files import make_dir, write_file
    from fedfleet.edge_agent.wire import signing
    from fedfleet.edge_agent.wire.protocol import derive_key, valid_id

    if new and public:
        raise click.UsageError("--new and --public cannot be used together")
    if new and ids:
        raise click.UsageError("--new makes keys; give agent IDs without it")
    if new and secret_file:
        write_file(secret_file, os.urandom(32).hex() + "\n", secret=True)  # never overwrites
        if not signing_key_file:
            return 0
    if new or public:
        if not signing_key_file:
            raise FedfleetError("--public needs --signing-key-file; --new needs --secret-file or --signing-key-file")
        if new:
            signing.write_private_key_file(signing_key_file, signing.new_signing_seed())
        print(signing.public_key(signing.read_key_file(signing_key_file, "--signing-key-file")).hex())
        return 0
    if not secret_file or not ids:
        raise FedfleetError("give --secret-file F and agent ids, or --signing-key-file K with --new or --public")

    for agent in ids:  # the ids are checked before the secret is read
        if not valid_id(agent):
            raise FedfleetError(f"agent id {agent!r}: use 1-64 characters of letters, digits, '-', '_' or '.'")
    secret = _read_secret(secret_file)
    for agent in ids:
        if out:
            path = write_file(make_dir(out, "--out") / f"{agent}.key", derive_key(secret, agent).hex() + "\n",
                              secret=True, replace=True)
            print(f"{agent} {path}")
        else:
            print(f"{agent} {derive_key(secret, agent).hex()}")
    return 0


@cli.command(context_settings=CONTEXT, short_help="Write the job's agent shards as .npz files for devices")
@click.option("--out", required=True, metavar="DIR", help="where the .npz files go (created if absent)")
@click.option("--roster", help="comma-separated agent ids: DIR/<id>.npz for each, as `serve --roster` and "
              "`provision --id` name them (default agent-00 .. agent-NN)")
@SHARD_OPTIONS
def shards(out: str, roster: str | None, **opts: Any) -> int:
    """Write the job's agent shards as .npz files (x, y) for devices (a continual job: DIR/<agent>/<task>.npz)."""
    import numpy as np

    from fedfleet.coordinator.job.run import agent_ids
    from fedfleet.coordinator.job.run import shards as job_shards

    cfg = _job_config(SimpleNamespace(**opts))
    if roster:
        from fedfleet.coordinator.job.config import apply

        ids = [a.strip() for a in roster.split(",") if a.strip()]
        apply(cfg, {"roster": ids}, "--roster")
        if opts.get("agents") is None:
            apply(cfg, {"agents": len(ids)}, "--roster")
    local, _ = job_shards(cfg)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.continual:  # a continual job: one folder per agent with a <task>.npz per task (fedfleet-agent --data DIR)
        from fedfleet.coordinator.tasks.schedule import parse
        from fedfleet.edge_agent.continual import derive

        schedule = parse(cfg.continual, "job")
        for agent, d in zip(agent_ids(cfg), local):
            (out_dir / agent).mkdir(exist_ok=True)
            for i, task in enumerate(schedule.tasks):
                t = derive(d, task.spec(i, schedule.head))
                np.savez(out_dir / agent / f"{task.name}.npz", x=t.x, y=t.y)
            print(out_dir / agent, len(schedule.tasks), "tasks")
        return 0
    for agent, d in zip(agent_ids(cfg), local):
        np.savez(out_dir / f"{agent}.npz", x=d.x, y=d.y)
        print(out_dir / f"{agent}.npz", len(d))
    return 0


@cli.command(context_settings=CONTEXT, short_help="Run Mosquitto in the foreground (a provisioned broker directory)")
@click.option("--dir", "directory", metavar="DIR",
              help="a broker directory from `fedfleet provision` (OUT/broker): run its mosquitto.conf")
@click.option("--port", type=int, default=0, help="without --dir: a throwaway broker on 127.0.0.1:PORT "
              "(default: a free port, printed)")
def broker(directory: str | None, port: int) -> int:
    """Run Mosquitto in the foreground until Ctrl-C or SIGTERM, which stop it too."""
    import tempfile

    from fedfleet.coordinator import broker as brokers

    if directory:
        return brokers.run_broker_dir(directory)
    with tempfile.TemporaryDirectory(prefix="fedfleet-broker-") as tmp:
        port = port or brokers.free_port()
        brokers.write_broker_dir(tmp, port=port, bind="127.0.0.1")
        def ready(proc: Any) -> None:  # the URL once Mosquitto listens
            brokers.wait_for_port(port, 10.0, proc)
            print(f"mqtt://127.0.0.1:{port}", flush=True)

        return brokers.run_foreground([brokers.mosquitto_executable(), "-c", f"{tmp}/mosquitto.conf"], on_start=ready)


# ---------------------------------------------------------------- running it
def main(argv: list[str] | None = None) -> int:
    """Run one command. Called without `argv` (the console script, `python -m fedfleet.coordinator.cli`) it owns the
    process and ends it as soon as the command is done (`fedfleet.coordinator.job.quick_exit`): a finished demo leaves
    in milliseconds instead of spending a second on interpreter teardown."""
    if argv is None:
        from fedfleet.coordinator.job.quick_exit import exit_now

        exit_now(_main(sys.argv[1:]))
    return _main(argv)


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(cli, argv, "fedfleet")


if __name__ == "__main__":
    sys.exit(main())
