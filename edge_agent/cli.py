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
Errors in options print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from fedfleet.edge_agent.errors import FedfleetError


def _key(args: argparse.Namespace) -> bytes:
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


OPTION_OF_FIELD = {"id": "agent_id"}  # agent.toml key -> argparse dest where they differ
DEFAULTS = {"fleet": "demo", "threads": 1, "meter": "auto"}


def _merge_config(args: argparse.Namespace) -> argparse.Namespace:
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
    if args.log_file is None:
        args.log_file = fields.get("log_file")
    args.log_max_bytes = fields.get("log_max_bytes", 1 << 20)
    args.log_backups = fields.get("log_backups", 3)
    return args


def _logging(args: argparse.Namespace) -> None:
    """Log to stderr, and to a bounded rotating file when agent.toml names one (a device's local log)."""
    import logging.handlers

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log_file:
        os.makedirs(os.path.dirname(args.log_file) or ".", exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(args.log_file, maxBytes=args.log_max_bytes,
                                                             backupCount=args.log_backups))
        root.setLevel(logging.INFO)  # a device's file log keeps the joins, reconnects and refusals
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


def _secrets(args: argparse.Namespace) -> tuple[str | None, bytes | None]:
    """The broker password and the coordinator's public key, each read from its file."""
    from fedfleet.edge_agent.config_file import read_public_key, read_secret_file

    password = getattr(args, "password", None)  # agent.toml may point at a password file only
    if args.password_file:
        password = read_secret_file(args.password_file, "--password-file")
    pub = read_public_key(args.coordinator_key_file) if args.coordinator_key_file else None
    return password, pub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        from fedfleet.edge_agent.mtvg.generate import main as generate

        return generate(argv[1:])
    p = argparse.ArgumentParser(prog="fedfleet-agent", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="agent.toml (from `fedfleet provision`); options given here override it")
    p.add_argument("--broker")
    p.add_argument("--fleet")
    p.add_argument("--id", dest="agent_id")
    p.add_argument("--key-file", help="the agent's key (hex, from `fedfleet keys`); or FEDFLEET_AGENT_KEY")
    p.add_argument("--max-skew", type=float, default=300.0, dest="max_skew_s",
                   help="seconds this device's clock may differ from the coordinator's (default 300)")
    p.add_argument("--data", help=".npz with x and y, .csv, an image folder, or loader.py:load "
                   "(a continual job: a directory of <task>.npz)")
    p.add_argument("--label-column", help="the label column of a --data .csv (default: label)")
    p.add_argument("--input-shape", help="the model's input shape, e.g. 1,28,28: images are resized to it, "
                   "flat rows reshaped")
    p.add_argument("--runtime", choices=("onnxruntime", "litert"))
    p.add_argument("--threads", type=int)
    p.add_argument("--profile", help="firmware profile name (its preferred runtime is used if --runtime is absent)")
    p.add_argument("--meter", help="energy meter: auto (default), model, rapl, jetson, rpi5, none")
    p.add_argument("--username")
    p.add_argument("--password-file", help="the broker password, in a file (never on the command line)")
    p.add_argument("--ca-certs")
    p.add_argument("--coordinator-key-file", help="the coordinator's public key (64 hex digits)")
    p.add_argument("--state-dir", help="kept across restarts (answered tasks, the package, error feedback); "
                   "overrides agent.toml's state_dir")
    p.add_argument("--log-file", help="a rotating local log (its directory is made); overrides agent.toml's log_file")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        args = _merge_config(args)
    except FedfleetError as exc:
        print(f"fedfleet-agent: error: {exc}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"fedfleet-agent: error: --threads must be an integer >= 1, got {args.threads}", file=sys.stderr)
        return 2
    _logging(args)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # numpy is not imported yet
        os.environ.setdefault(var, str(max(1, args.threads)))
    from fedfleet.edge_agent.agent import Agent, AgentConfig, Host

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
                logging.getLogger("fedfleet-agent").warning("no energy meter (%s); energy is not recorded", exc)
        data = _local_data(args)
        agent = Agent(cfg, data, meter=meter, host=Host.solo())  # alone on its device: shares nothing
    except (FedfleetError, ValueError) as exc:
        print(f"fedfleet-agent: error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # systemd's stop: leave gracefully (offline status)
    log = logging.getLogger("fedfleet-agent")
    log.info("agent %s of fleet %s starting on %s (runtime %s, state %s)", cfg.agent_id, cfg.fleet, cfg.broker,
             cfg.runtime, cfg.state_dir or "not kept")
    agent.run_forever()
    log.info("agent %s stopped", cfg.agent_id)
    return 0


def _local_data(args: argparse.Namespace) -> Any:
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
