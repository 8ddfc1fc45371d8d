"""The `fedfleet` command line as a user meets it: --version, unknown commands, each command's own options with
help, no abbreviations, the benchmark listing, one-line errors that never repeat a secret, and a clear message
when a command needs a package this install lacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import click
import pytest

from fedfleet.coordinator import cli

NO_BROKER = "mqtt://127.0.0.1:1"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, r.stdout[-1000:], err[-2000:])
    assert "Traceback" not in err and "\n" not in err, err
    return err


def test_version_help_and_an_unknown_command():
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fedfleet {version('fedfleet')}", r
    bare = _run()
    assert bare.returncode == 0 and "Commands:" in bare.stdout
    for name in ("demo", "serve", "keys", "shards", "broker", "provision", "report", "generate", "emulate", "bench"):
        assert f"\n  {name} " in bare.stdout, (name, bare.stdout)
    err = _one_line(_run("frobnicate"))
    assert "No such command 'frobnicate'" in err and "fedfleet --help" in err
    assert cli.main(["frobnicate"]) == 2 and cli.main(["--help"]) == 0


def _options(command: click.Command) -> set[str]:
    return {o for p in command.get_params(click.Context(command, **command.context_settings)) if isinstance(p, click.Option) for o in p.opts}


def test_every_option_of_every_command_has_help_and_each_command_only_its_own():
    ctx = click.Context(cli.cli)
    built_in = {name: cli.cli.get_command(ctx, name) for name in ("demo", "serve", "keys", "shards", "broker")}
    for name, command in [("fedfleet", cli.cli), *built_in.items()]:
        assert command.help, name
        for p in command.get_params(click.Context(command, **command.context_settings)):
            if isinstance(p, click.Option):
                assert p.help and len(p.help) > 10, (name, p.opts)
    shards = _options(built_in["shards"])
    assert not shards & {"--quorum", "--metrics-port", "--report", "--rounds", "--deadline", "--resume", "--json"}
    assert {"--out", "--agents", "--alpha", "--config", "--seed"} <= shards
    assert _options(built_in["broker"]) == {"--dir", "--port", "-h", "--help"}
    assert not _options(built_in["keys"]) & {"--rounds", "--config"}
    assert {"--secret-file", "--roster", "--wait", "--rounds", "--quorum"} <= _options(built_in["serve"])
    assert "--secret-file" not in _options(built_in["demo"])
    help_text = _run("shards", "--help")
    assert help_text.returncode == 0 and "--quorum" not in help_text.stdout and "--agents" in help_text.stdout


def test_options_are_never_abbreviated():
    err = _one_line(_run("demo", "--round", "1", "--broker", NO_BROKER))
    assert "No such option '--round'" in err and "--rounds" in err  # a hint, not a guess
    err = _one_line(_run("shards", "--out", "x", "--quorum", "0.5"))
    assert "No such option '--quorum'" in err
    err = _one_line(_run("report", "--ou", "x", "runs/none"))  # a pass-through command's own parser too
    assert "--ou" in err


def test_bench_lists_every_benchmark_with_a_line_and_each_has_its_help():
    from fedfleet.tools import bench

    listed = _run("bench", "--help")
    assert listed.returncode == 0, listed.stderr
    assert _run("bench").stdout == listed.stdout
    names = bench.names()
    assert len(names) >= 15 and "codec" in names and "rounds" in names and "runner" not in names
    for name in names:
        line = next((ln for ln in listed.stdout.splitlines() if ln.startswith(f"  {name} ")), None)
        assert line is not None and len(line.split(maxsplit=1)[1]) > 15, (name, listed.stdout)
    for name in ("codec", "rounds"):
        r = _run("bench", name, "--help")
        assert r.returncode == 0 and f"fedfleet bench {name}" in r.stdout and "--json" in r.stdout, r.stderr
    assert "unknown benchmark 'nosuch'" in _one_line(_run("bench", "nosuch"))
    assert "unknown benchmark 'runner'" in _one_line(_run("bench", "runner"))


def test_the_method_error_names_only_public_methods():
    err = _one_line(_run("demo", "--broker", NO_BROKER, "--method", "nosuch"))
    listed = err.split("must be one of ")[1].split(", got")[0]
    assert "fedavg" in listed and "_" not in listed.replace("lora_fair", "").replace("robust_fedavg", ""), err


def test_errors_never_repeat_a_secret(tmp_path):
    short = tmp_path / "short.secret"
    short.write_text("hunter2hunter")  # too short to be a fleet secret
    err = _one_line(_run("keys", "--secret-file", str(short), "pi-01"))
    assert "16 bytes" in err and "hunter2" not in err
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("s3cr3t-not-a-signing-key\n")
    err = _one_line(_run("keys", "--signing-key-file", str(bad_key), "--public"))
    assert "--signing-key-file" in err and "s3cr3t" not in err
    secret = tmp_path / "fleet.secret"
    secret.write_text("f" * 64)
    err = _one_line(_run("keys", "--secret-file", str(secret), "pi/01"))
    assert "pi/01" in err and "f" * 16 not in err


def test_a_command_that_needs_a_missing_package_names_the_extra(tmp_path):
    code = textwrap.dedent("""
        import sys
        class NoTorch:  # as on an install without the [coordinator] extra
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, NoTorch())
        from fedfleet.coordinator import cli
        sys.exit(cli.main(sys.argv[1:]))
    """)
    r = subprocess.run([sys.executable, "-c", code, "demo", "--broker", "memory", "--rounds", "1", "--agents", "2",
                        "--run-dir", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, timeout=120)
    err = _one_line(r, code=1)
    assert "'torch'" in err and "pip install 'fedfleet[coordinator]'" in err


@pytest.mark.parametrize("args", [["keys", "--new", "--public", "--signing-key-file", "k"], ["demo", "--agents", "x"],
                                  ["demo", "--mode", "half"], ["serve", "--broker", NO_BROKER]])
def test_usage_errors_are_one_line(args):
    err = _one_line(_run(*args))
    assert err.startswith(f"fedfleet {args[0]}: error: "), err


PASS_THROUGH = ["fedfleet.tools.emulate.run", "fedfleet.coordinator.records.report", "fedfleet.coordinator.job.provision",
                "fedfleet.coordinator.mtvg.generate", "fedfleet.edge_agent.mtvg.generate"]


def test_every_option_of_the_pass_through_commands_has_help_and_none_is_abbreviated(monkeypatch):
    """The benchmarks and the other commands that parse their own arguments: each builds its parser with the
    CLI's conventions (`ArgParser`) and documents every option."""
    import argparse
    import importlib

    from fedfleet.edge_agent.cli_run import ArgParser
    from fedfleet.tools import bench

    class Built(Exception):
        pass

    def stop(self, *args, **kwargs):
        raise Built(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", stop)  # nothing runs, whatever the parser
    modules = [f"fedfleet.tools.bench.{n}" for n in bench.names()] + PASS_THROUGH
    for module in modules:
        with pytest.raises(Built) as built:
            importlib.import_module(module).main([])
        parser = built.value.args[0]
        assert isinstance(parser, ArgParser) and parser.allow_abbrev is False, module
        undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert not undocumented, (module, undocumented)


def test_in_process_callers_get_a_return_code_from_pass_through_commands(capsys):
    assert cli.main(["bench", "codec", "--help"]) == 0
    assert "fedfleet bench codec" in capsys.readouterr().out
    assert cli.main(["bench", "codec", "--d", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--d" in err and "fedfleet bench codec --help" in err, err
