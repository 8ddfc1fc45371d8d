"""`fedfleet-agent`: run one edge agent on a device (or in a terminal) until interrupted.

    fedfleet-agent --broker mqtts://host:8883 --fleet lab --id pi-07 --key-file pi-07.key --data pi-07.npz \
                   --coordinator-key-file coordinator.pub \
                   [--runtime onnxruntime|litert] [--threads 2] [--profile rpi4] [--ca-certs ca.pem]

The key is the agent's own key (`fedfleet keys` prints it on the coordinator host); the coordinator key is
the public half of the coordinator's signing key (`fedfleet keys --signing-key-file K --public`), which the
agent pins: it takes tasks and model packages signed with it and nothing else. The data file is a .npz with
`x` and `y`, or for a continual job a directory with one `<task>.npz` per task. Errors in options print one
clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edge_agent.errors import FedfleetError


def _key(args: argparse.Namespace) -> bytes:
    text = args.key or os.environ.get("FEDFLEET_AGENT_KEY")
    if args.key_file:
        try:
            text = open(args.key_file).read().split()[-1]
        except (OSError, IndexError) as exc:
            raise FedfleetError(f"--key-file {args.key_file}: cannot read a key ({exc})") from None
    if not text:
        raise FedfleetError("give the agent key with --key, --key-file or FEDFLEET_AGENT_KEY")
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise FedfleetError("the agent key must be hex, as printed by `fedfleet keys`") from None
    if len(key) != 32:
        raise FedfleetError(f"the agent key must be 32 bytes (64 hex digits), got {len(key)}")
    return key


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedfleet-agent", description=__doc__.splitlines()[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", default="demo")
    p.add_argument("--id", required=True, dest="agent_id")
    p.add_argument("--key")
    p.add_argument("--key-file")
    p.add_argument("--coordinator-key-file", required=True,
                   help="the coordinator's public key (coordinator.pub, 64 hex characters) to pin")
    p.add_argument("--max-skew", type=float, default=300.0, dest="max_skew_s",
                   help="seconds this device's clock may differ from the coordinator's (default 300)")
    p.add_argument("--data", required=True, help=".npz with x and y (a continual job: a directory of <task>.npz)")
    p.add_argument("--runtime", choices=("onnxruntime", "litert"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", help="firmware profile name (its preferred runtime is used if --runtime is absent)")
    p.add_argument("--meter", default="auto", help="energy meter: auto (default), model, rapl, jetson, rpi5, none")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--ca-certs")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 1:
        print(f"fedfleet-agent: error: --threads must be an integer >= 1, got {args.threads}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # numpy is not imported yet
        os.environ.setdefault(var, str(max(1, args.threads)))
    from edge_agent.agent import Agent, AgentConfig, load_npz
    from edge_agent.signing import read_key_file

    try:
        if not 0 <= args.max_skew_s < 86400:
            raise FedfleetError(f"--max-skew must be a number of seconds in [0, 86400), got {args.max_skew_s}")
        runtime, threads = args.runtime, args.threads
        if args.profile and runtime is None:
            from firmware_profiles.schema import load_profile

            prof = load_profile(args.profile)
            runtime = prof.runtime
            threads = args.threads if args.threads != 1 else prof.threads
        cfg = AgentConfig(args.broker, args.fleet, args.agent_id, _key(args), runtime=runtime or "onnxruntime",
                          threads=threads, profile=args.profile, username=args.username,
                          password=args.password, ca_certs=args.ca_certs,
                          coordinator_key=read_key_file(args.coordinator_key_file, "--coordinator-key-file"),
                          max_skew_s=args.max_skew_s)
        meter = None
        if args.meter != "none":
            from edge_agent.meters import MeterError, open_meter

            try:
                meter = open_meter(args.meter, args.profile)
            except MeterError as exc:
                if args.meter != "auto":
                    raise
                logging.getLogger("fedfleet-agent").warning("no energy meter (%s); energy is not recorded", exc)
        from edge_agent.continual import load_task_dir

        data = load_task_dir(args.data) if os.path.isdir(args.data) else load_npz(args.data)
        agent = Agent(cfg, data, meter=meter)
    except (FedfleetError, ValueError) as exc:
        print(f"fedfleet-agent: error: {exc}", file=sys.stderr)
        return 2
    agent.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
