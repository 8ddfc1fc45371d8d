"""`fedfleet-agent`: run one edge agent on a device (or in a terminal) until interrupted.

    fedfleet-agent --broker mqtts://host:8883 --fleet lab --id pi-07 --key-file pi-07.key --data pi-07.npz \
                   --coordinator-key-file coordinator.pub \
                   [--runtime onnxruntime|litert] [--threads 2] [--profile rpi4] [--ca-certs ca.pem]

    fedfleet-agent --config agent.toml     (the file `fedfleet provision` writes; see edge_agent/config_file.py)

    fedfleet-agent generate --model denoiser.onnx --weights denoiser.npz --prompts "3 right; 3 down" --out DIR
                           (MTVG sampling through ONNX Runtime; see edge_agent/mtvg/generate.py)

The key is the agent's own key (`fedfleet keys` prints it on the coordinator host); the coordinator key is
the public half of the coordinator's signing key (`fedfleet keys --signing-key-file K --public`), which the
agent pins: it takes tasks and model packages signed with it and nothing else. Secrets come from files (or
the environment), never from the command line: `--key-file` (or FEDFLEET_AGENT_KEY), `--password-file`.
`--data` is the device's own data (`fedfleet.edge_agent.data`): a .npz with `x` and `y`; a .csv with a header, a
label column (`--label-column`, default `label`) and numeric feature columns; a folder of images with one
subfolder per class named by its index (`0/`, `1_kettle/`), resized to `--input-shape` (e.g. 1,28,28); a
Python loader `loader.py:load` returning (x, y); or for a continual job a directory with one `<task>.npz`
per task. `--input-shape` also reshapes flat rows (a CSV row of 256 numbers for a 1,256 model input).
The agent logs what it does at INFO (connecting, each model package received and verified, each task trained
and sent, every refusal and error), to stderr and to agent.toml's `log_file`; `-q` keeps only warnings and
errors, `-v` adds debugging detail. Errors in options print one clear line and exit 2.

The command line is click's, as `fedfleet`'s is (see `fedfleet.edge_agent.cli_run`): one small pure-Python
package with no dependencies of its own, about 1 MB on a device.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import SimpleNamespace
from typing import Any

import click

from fedfleet.edge_agent.cli_run import CONTEXT, pass_through, version_option
from fedfleet.edge_agent.cli_run import run as run_click
from fedfleet.edge_agent.errors import FedfleetError


def _key(args: Any) -> bytes:
    text = os.environ.get("FEDFLEET_AGENT_KEY")
    if args.key_file:
        try:
            text = open(args.key_file).read().split()[-1]
        except (OSError, IndexError) as exc:
            raise FedfleetError(f"--key-file {args.key_file}: cannot read a key ({exc})") from None
    if not text:
        raise FedfleetError("give the agent key with --key-file (or FEDFLEET_AGENT_KEY in the environment)")
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise FedfleetError("the agent key must be hex, as printed by `fedfleet keys`") from None
    if len(key) != 32:
        raise FedfleetError(f"the agent key must be 32 bytes (64 hex digits), got {len(key)}")
    return key


OPTION_OF_FIELD = {"id": "agent_id"}  # agent.toml key -> the option's name where they differ
DEFAULTS = {"fleet": "demo", "threads": 1, "meter": "auto"}


def _merge_config(args: Any) -> Any:
    """Fill options not given on the command line from --config, then the defaults; check the required ones."""
    from fedfleet.edge_agent.config_file import load

    fields = load(args.config) if args.config else {}
    for key, value in fields.items():
        dest = OPTION_OF_FIELD.get(key, key)
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    for dest, what in (("broker", "--broker (or broker)"), ("agent_id", "--id (or id)"), ("data", "--data (or data)"),
                       ("coordinator_key_file", "--coordinator-key-file (or coordinator_key_file)")):
        if not getattr(args, dest):
            raise FedfleetError(f"{what} is required, on the command line or in --config")
    if getattr(args, "log_file", None) is None:
        args.log_file = fields.get("log_file")
    args.log_max_bytes = fields.get("log_max_bytes", 1 << 20)
    args.log_backups = fields.get("log_backups", 3)
    return args


def _logging(args: Any) -> None:
    """Log to stderr, and to a bounded rotating file when agent.toml names one (a device's local log)."""
    import logging.handlers

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    level = logging.DEBUG if args.verbose else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    stderr = logging.StreamHandler()
    stderr.setLevel(level)
    handlers: list[logging.Handler] = [stderr]
    if args.log_file:
        os.makedirs(os.path.dirname(args.log_file) or ".", exist_ok=True)
        log_file = logging.handlers.RotatingFileHandler(args.log_file, maxBytes=args.log_max_bytes,
                                                        backupCount=args.log_backups)
        log_file.setLevel(min(level, logging.INFO))  # a device's file log keeps the joins, tasks and refusals
        handlers.append(log_file)
    root.setLevel(min(h.level for h in handlers))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


def _secrets(args: Any) -> tuple[str | None, bytes | None]:
    """The broker password and the coordinator's public key, each read from its file."""
    from fedfleet.edge_agent.config_file import read_public_key, read_secret_file

    password = getattr(args, "password", None)  # agent.toml may point at a password file only
    if args.password_file:
        password = read_secret_file(args.password_file, "--password-file")
    pub = read_public_key(args.coordinator_key_file) if args.coordinator_key_file else None
    return password, pub


class AgentCommand(click.Group):
    """The agent's own options, and one subcommand (`generate`) whose module parses its own arguments."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return ["generate"]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name != "generate":
            return None

        def generate(argv: list[str]) -> int:
            from fedfleet.edge_agent.mtvg.generate import main

            return main(argv)

        return pass_through("generate", "MTVG sampling of a prompt sequence on this device through ONNX Runtime "
                            "(`fedfleet-agent generate --help`)", generate)


@click.group(cls=AgentCommand, invoke_without_command=True, context_settings=CONTEXT,
             help="Run one edge agent on a device (or in a terminal) until interrupted: it joins the fleet on the "
             "broker, takes the coordinator's signed tasks, trains on this device's data and sends the results. "
             "It logs what it does (connecting, packages, tasks, errors) at INFO; -q keeps only warnings.")
@version_option("fedfleet-agent")
@click.option("--config", metavar="FILE", help="agent.toml (from `fedfleet provision`); options given here override it")
@click.option("--broker", help="the broker: mqtt://host:port or mqtts://host:port")
@click.option("--fleet", help="fleet name, the coordinator's (default demo)")
@click.option("--id", "agent_id", help="this agent's id, as in the coordinator's roster (e.g. pi-07)")
@click.option("--key-file", "key_file", metavar="FILE", help="the agent's key (hex, from `fedfleet keys`); or "
              "FEDFLEET_AGENT_KEY in the environment")
@click.option("--max-skew", "max_skew_s", type=float, default=300.0, show_default=True,
              help="seconds this device's clock may differ from the coordinator's")
@click.option("--data", metavar="PATH", help=".npz with x and y, .csv, an image folder, or loader.py:load (a "
              "continual job: a directory of <task>.npz)")
@click.option("--label-column", "label_column", help="the label column of a --data .csv (default: label)")
@click.option("--input-shape", "input_shape", metavar="SHAPE", help="the model's input shape, e.g. 1,28,28: "
              "images are resized to it, flat rows reshaped")
@click.option("--runtime", type=click.Choice(["onnxruntime", "litert"]),
              help="inference runtime (default: the profile's, else onnxruntime)")
@click.option("--threads", type=int, help="CPU threads for inference and numpy (default 1, or the profile's)")
@click.option("--profile", help="firmware profile name, e.g. rpi4b (its preferred runtime is used if --runtime "
              "is absent)")
@click.option("--meter", help="energy meter: auto (default), model, rapl, jetson, rpi5, none")
@click.option("--username", help="broker user name (with --password-file, for a broker with users and an ACL)")
@click.option("--password-file", "password_file", metavar="FILE",
              help="the broker password, in a file (never on the command line)")
@click.option("--ca-certs", "ca_certs", metavar="FILE", help="CA certificate file for an mqtts:// broker")
@click.option("--coordinator-key-file", "coordinator_key_file", metavar="FILE",
              help="the coordinator's public key (64 hex digits, from `fedfleet keys --public`)")
@click.option("--state-dir", "state_dir", metavar="DIR",
              help="kept across restarts (answered tasks, the package, error feedback); overrides agent.toml's "
              "state_dir")
@click.option("--log-file", "log_file", metavar="FILE",
              help="a rotating local log (its directory is made); overrides agent.toml's log_file")
@click.option("-v", "--verbose", is_flag=True, help="log debugging detail too")
@click.option("-q", "--quiet", is_flag=True, help="log only warnings and errors")
@click.pass_context
def cli(ctx: click.Context, **opts: Any) -> int | None:
    if ctx.invoked_subcommand is not None:
        return None
    return run_agent(SimpleNamespace(**opts))


def main(argv: list[str] | None = None) -> int:
    return run_click(cli, list(sys.argv[1:] if argv is None else argv), "fedfleet-agent")


def run_agent(args: Any) -> int:
    """Run the agent until SIGTERM or Ctrl-C; FedfleetError for bad options (one line, exit 2)."""
    args = _merge_config(args)
    if args.threads < 1:
        raise FedfleetError(f"--threads must be an integer >= 1, got {args.threads}")
    _logging(args)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # numpy is not imported yet
        os.environ.setdefault(var, str(max(1, args.threads)))
    from fedfleet.edge_agent.agent import Agent, AgentConfig, Host

    log = logging.getLogger("fedfleet-agent")
    try:
        if not 0 <= args.max_skew_s < 86400:
            raise FedfleetError(f"--max-skew must be a number of seconds in [0, 86400), got {args.max_skew_s}")
        runtime, threads = args.runtime, args.threads
        if args.profile and runtime is None:
            from fedfleet.edge_agent.profiles import load_profile

            prof = load_profile(args.profile)
            runtime = prof.runtime
            threads = args.threads if args.threads != 1 else prof.threads
        password, coordinator_key = _secrets(args)
        cfg = AgentConfig(args.broker, args.fleet, args.agent_id, _key(args), runtime=runtime or "onnxruntime",
                          threads=threads, profile=args.profile, username=args.username,
                          password=password, ca_certs=args.ca_certs, coordinator_key=coordinator_key,
                          max_skew_s=args.max_skew_s, state_dir=args.state_dir)
        meter = None
        if args.meter != "none":
            from fedfleet.edge_agent.meters import MeterError, open_meter

            try:
                meter = open_meter(args.meter, args.profile)
            except MeterError as exc:
                if args.meter != "auto":
                    raise
                log.info("no energy meter (%s); energy is not recorded", exc)
        data = _local_data(args)
        agent = Agent(cfg, data, meter=meter, host=Host.solo())  # alone on its device: shares nothing
    except ValueError as exc:
        raise FedfleetError(str(exc)) from None
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # systemd's stop: leave gracefully (offline status)
    log.info("agent %s of fleet %s starting on %s (runtime %s, %d thread(s), %d samples, state %s)",
             cfg.agent_id, cfg.fleet, cfg.broker, cfg.runtime, cfg.threads, len(data),
             cfg.state_dir or "not kept")
    agent.run_forever()
    log.info("agent %s stopped", cfg.agent_id)
    return 0


def _local_data(args: Any) -> Any:
    """The device's data from --data (see the module docstring); FedfleetError saying what is wrong."""
    from fedfleet.edge_agent.data import check, load_path, parse_shape

    path = str(args.data)
    if os.path.isdir(path) and any(f.endswith(".npz") for f in os.listdir(path)):  # a continual job's tasks
        from fedfleet.edge_agent.continual import load_task_dir

        return load_task_dir(path)
    shape = parse_shape(args.input_shape, "--input-shape") if args.input_shape else None
    data = load_path(path, label=args.label_column or "label", shape=shape)
    return check(data, f"--data {path}", shape)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
