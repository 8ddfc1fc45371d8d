"""`fedfleet`: the coordinator and tools command line.

    fedfleet demo [--broker embedded|mosquitto|memory|URL] [--config job.toml] [--json PATH] ...
    fedfleet serve --broker URL --secret-file F --signing-key-file K --roster pi-01,pi-02 [--config job.toml]
    fedfleet serve|demo ... --resume RUN_DIR        continue a run killed mid-way (the same job's options)
    fedfleet keys --secret-file F ID [ID ...]        per-agent keys for devices
    fedfleet keys --signing-key-file K --new|--public  make the coordinator's signing key / print its public key
    fedfleet shards --out DIR [--agents N --alpha A]  local data files (.npz) for devices (per task
                                                     in a continual job: DIR/<agent>/<task>.npz)
    fedfleet broker [--port P]                       a Mosquitto broker on loopback, in the foreground
    fedfleet bench NAME [...]                         benchmarks (tools/bench/NAME.py)
    fedfleet report RUN_DIR                          HTML and PNG report of a run
    fedfleet emulate FLEET.toml                      an emulated fleet against a broker
    fedfleet provision --id pi-07 --broker URL --secret-file F --out DIR   files and a service for devices
    fedfleet generate --prompts "3 right; 3 down" --out DIR --run RUN_DIR|--weights F   MTVG clip sequence

Errors in input (config files, options) print one clear line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from fedfleet.edge_agent.errors import FedfleetError

PLUGINS = ("bench", "emulate")  # commands of fedfleet.tools, found through entry points
COMMANDS = ("demo", "serve", "keys", "shards", "broker", "bench", "report", "emulate", "provision", "generate")


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="job TOML file (see coordinator/job/config.py for the fields)")
    p.add_argument("--method", help="fedavg (default), fedzo, fzoos, ...")
    p.add_argument("--rounds", type=int)
    p.add_argument("--agents", type=int)
    p.add_argument("--per-round", type=int, dest="per_round")
    p.add_argument("--alpha", type=float, help="Dirichlet label skew (0 = IID)")
    p.add_argument("--mode", choices=("transfer", "full", "lora"))
    p.add_argument("--dataset", choices=("digits", "mnist"))
    p.add_argument("--hidden", type=int, help="hidden width of the MLP")
    p.add_argument("--runtime", choices=("onnxruntime", "litert"))
    p.add_argument("--task", help="classification (default) or moving-digits-diffusion (fedavg trains a video denoiser)")
    p.add_argument("--eval-every", type=int, dest="eval_every", help="moving-digits-diffusion: evaluate every N rounds")
    p.add_argument("--seed", type=int)
    p.add_argument("--deadline", type=float, dest="deadline_s", help="seconds per round phase")
    p.add_argument("--quorum", type=float)
    p.add_argument("--fleet")
    p.add_argument("--uplink", help="uplink codec preset: none, zstd, fedzip (z 0.03, k 3, e4, error feedback), "
                   "or JSON such as '{\"name\":\"fedzip\",\"z\":0.01}' (unset keys take the codec's defaults)")
    p.add_argument("--downlink", choices=("none", "zstd", "fedzip"),
                   help="task codec: fedzip (default: the change since each agent's replica), none (dense) or zstd "
                   "(lossless)")
    p.add_argument("--run-dir", help="where the ledger, checkpoints and summary go (default runs/<run id>)")
    p.add_argument("--json", help="write the summary JSON here too")
    p.add_argument("--metrics-port", type=int, help="serve live Prometheus metrics on 127.0.0.1:PORT (0: any)")
    p.add_argument("--report", choices=("background", "now", "none"), default="background",
                   help="render the HTML/PNG report in its own process after the summary (default), in this one, or not")


def _job_config(args: argparse.Namespace):  # noqa: ANN202
    from fedfleet.coordinator.job import config

    port = getattr(args, "metrics_port", None)
    if port is not None and not 0 <= port <= 65535:
        raise FedfleetError(f"--metrics-port must be a TCP port in 0..65535 (0: any free port), got {port}")

    cfg = config.load(args.config) if args.config else config.JobConfig()
    overrides = {k: getattr(args, k) for k in ("method", "rounds", "agents", "per_round", "alpha", "mode",
                                                 "dataset", "hidden", "runtime", "seed", "deadline_s", "quorum", "fleet", "downlink",
                                                 "task", "eval_every")
                 if getattr(args, k, None) is not None}
    config.apply(cfg, overrides, "command line")
    if args.uplink:
        try:
            spec = json.loads(args.uplink) if args.uplink.startswith("{") else config.uplink_preset(args.uplink)
        except json.JSONDecodeError as exc:
            raise FedfleetError(f"--uplink: not valid JSON ({exc})") from None
        cfg.uplink = config.check_codec(spec, "--uplink")
    return config.check_task(cfg)


def _resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint "
                   "(give the job's own options; only --rounds and --deadline may change)")


def _run_dir(args: argparse.Namespace) -> str | None:
    """The run directory: --resume's, or --run-dir (they must agree when both are given)."""
    if args.resume and args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
        raise FedfleetError(f"--resume {args.resume} and --run-dir {args.run_dir} name different run directories")
    return args.resume or args.run_dir


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def cmd_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fedfleet demo", description="broker + coordinator + agents, one command")
    p.add_argument("--broker", default="embedded", help="embedded (default), mosquitto, memory (in-process, no sockets) or mqtt://host:port")
    p.add_argument("--quiet", action="store_true")
    _job_args(p)
    _resume_args(p)
    args = p.parse_args(argv)
    cfg = _job_config(args)  # checked before the job's heavy imports
    run_dir = _run_dir(args)
    from fedfleet.coordinator.job.run import run_demo

    result = run_demo(cfg, broker=args.broker, run_dir=run_dir, quiet=args.quiet,
                      metrics_port=args.metrics_port, resume=bool(args.resume), report=args.report)
    _write_json(args.json, result.to_json())
    print(json.dumps(result.to_json()))
    return 0


def _read_secret(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise FedfleetError(f"--secret-file {path}: {exc.strerror}") from None
    if len(secret) < 16:
        raise FedfleetError(f"--secret-file {path}: the fleet secret must be at least 16 bytes")
    return secret


def cmd_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fedfleet serve", description="run the coordinator for agents on devices")
    p.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--secret-file", required=True, help="the fleet secret (keep it off the devices)")
    p.add_argument("--signing-key-file", required=True,
                   help="the coordinator's Ed25519 signing key (`fedfleet keys --signing-key-file K --new`)")
    p.add_argument("--roster", help="comma-separated agent ids (default: agent-00 .. agent-NN)")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for a quorum of agents")
    p.add_argument("--username", help="broker user (with a password file and ACL)")
    p.add_argument("--password-file", help="the broker password, in a file (never on the command line)")
    p.add_argument("--ca-certs", help="CA file for an mqtts:// broker")
    _job_args(p)
    _resume_args(p)
    args = p.parse_args(argv)
    from fedfleet.coordinator.job.config import apply

    cfg = _job_config(args)
    args.password = None
    if args.password_file:
        try:
            args.password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise FedfleetError(f"--password-file {args.password_file}: {exc.strerror}") from None
    if args.roster:
        apply(cfg, {"roster": [a.strip() for a in args.roster.split(",") if a.strip()]}, "--roster")
    run_dir = _run_dir(args)
    from fedfleet.coordinator.job.run import serve
    from fedfleet.edge_agent.wire.signing import read_key_file

    result = serve(cfg, broker=args.broker, secret=_read_secret(args.secret_file),
                   signing_key=read_key_file(args.signing_key_file, "--signing-key-file"),
                   run_dir=run_dir, wait_s=args.wait, username=args.username, password=args.password,
                   ca_certs=args.ca_certs, metrics_port=args.metrics_port, resume=bool(args.resume),
                   report=args.report, secret_files={"--secret-file": args.secret_file,
                                                     "--signing-key-file": args.signing_key_file,
                                                     "--password-file": args.password_file})
    _write_json(args.json, result.to_json())
    return 0


def cmd_keys(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fedfleet keys", description="print each agent's key (hex), or make the "
                                "coordinator's signing key and print its public key")
    p.add_argument("--secret-file")
    p.add_argument("--signing-key-file", help="the coordinator's signing key file (coordinator.key)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--new", action="store_true", help="create the signing key file (never overwrites)")
    mode.add_argument("--public", action="store_true", help="print the public key (hex) for agents to pin")
    p.add_argument("ids", nargs="*")
    args = p.parse_args(argv)
    from fedfleet.edge_agent.wire import signing
    from fedfleet.edge_agent.wire.protocol import derive_key, valid_id

    if args.new or args.public:
        if not args.signing_key_file:
            raise FedfleetError("--new and --public need --signing-key-file")
        if args.new:
            signing.write_private_key_file(args.signing_key_file, signing.new_signing_seed())
        print(signing.public_key(signing.read_key_file(args.signing_key_file, "--signing-key-file")).hex())
        return 0
    if not args.secret_file or not args.ids:
        raise FedfleetError("give --secret-file F and agent ids, or --signing-key-file K with --new or --public")

    secret = _read_secret(args.secret_file)
    for agent in args.ids:
        if not valid_id(agent):
            raise FedfleetError(f"agent id {agent!r}: use 1-64 characters of letters, digits, '-', '_' or '.'")
        print(f"{agent} {derive_key(secret, agent).hex()}")
    return 0


def cmd_shards(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fedfleet shards", description="write digits shards as .npz for devices")
    p.add_argument("--out", required=True)
    _job_args(p)
    args = p.parse_args(argv)
    import numpy as np

    from fedfleet.coordinator.job.run import agent_ids, shards

    cfg = _job_config(args)
    local, _ = shards(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.continual:  # a continual job: one folder per agent with a <task>.npz per task (fedfleet-agent --data DIR)
        from fedfleet.coordinator.tasks.schedule import parse
        from fedfleet.edge_agent.continual import derive

        schedule = parse(cfg.continual, "job")
        for agent, d in zip(agent_ids(cfg), local):
            (out / agent).mkdir(exist_ok=True)
            for i, task in enumerate(schedule.tasks):
                t = derive(d, task.spec(i, schedule.head))
                np.savez(out / agent / f"{task.name}.npz", x=t.x, y=t.y)
            print(out / agent, len(schedule.tasks), "tasks")
        return 0
    for agent, d in zip(agent_ids(cfg), local):
        np.savez(out / f"{agent}.npz", x=d.x, y=d.y)
        print(out / f"{agent}.npz", len(d))
    return 0


def cmd_broker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fedfleet broker", description="run Mosquitto on loopback until Ctrl-C")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    import signal
    import time

    from fedfleet.coordinator.broker import MosquittoBroker

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    b = MosquittoBroker(args.port or None)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops Mosquitto too, not only Ctrl-C
    print(b.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        b.stop()
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    return int(importlib.import_module(module).main(argv) or 0)


def _plugin(cmd: str, argv: list[str]) -> int:
    """A command that a layer above the coordinator registers (entry points `fedfleet.commands`: the tools'
    `bench` and `emulate`); the coordinator never imports them by name."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="fedfleet.commands") if ep.name == cmd]
    if not found:
        raise FedfleetError(f"command {cmd!r} is not installed (no 'fedfleet.commands' entry point); "
                            "reinstall fedfleet: pip install -e '.[all]'")
    return int(found[0].load()(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Called without `argv` (the console script, `python -m fedfleet.coordinator.cli`) it owns the
    process and ends it as soon as the command is done (`fedfleet.coordinator.job.quick_exit`): a finished demo leaves
    in milliseconds instead of spending a second on interpreter teardown."""
    if argv is None:
        from fedfleet.coordinator.job.quick_exit import exit_now

        exit_now(_main(sys.argv[1:]))
    return _main(argv)


def _main(argv: list[str]) -> int:
    argv = list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "report":
            return _delegate("fedfleet.coordinator.records.report", rest)
        if cmd in PLUGINS:
            return _plugin(cmd, rest)
        if cmd == "provision":
            return _delegate("fedfleet.coordinator.job.provision", rest)
        if cmd == "generate":
            return _delegate("fedfleet.coordinator.mtvg.generate", rest)
        return {"demo": cmd_demo, "serve": cmd_serve, "keys": cmd_keys, "shards": cmd_shards,
                "broker": cmd_broker}[cmd](rest)
    except FedfleetError as exc:
        print(f"fedfleet {cmd}: error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, ConnectionError) as exc:
        print(f"fedfleet {cmd}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
