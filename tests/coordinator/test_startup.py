"""Start-up, memory and exit: what the demo process imports, loads once, shares among its agents, and how
it leaves."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from fedfleet.models import data as datasets


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_digits_equals_sklearn_load_digits_exactly():
    from sklearn.datasets import load_digits

    ours = datasets.digits()
    ref = load_digits()
    assert ours.x.dtype == np.float32 and ours.y.dtype == np.int64
    assert ours.x.shape == (1797, 64) and ours.y.shape == (1797,)
    assert np.array_equal(ours.x, (ref.data / 16.0).astype(np.float32))
    assert np.array_equal(ours.y, ref.target.astype(np.int64))


def test_digits_callers_get_their_own_arrays():
    a = datasets.digits()
    a.x[0, 0] = 99.0
    a.y[0] = 7
    b = datasets.digits()
    assert b.x[0, 0] != 99.0 and b.y[0] == 0


def test_reading_digits_does_not_import_sklearn():
    r = _run("""
        import sys
        from fedfleet.models import data
        d = data.digits()
        print(len(d), "sklearn" in sys.modules, "scipy" in sys.modules, "pandas" in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1797", "False", "False", "False"], r.stdout


def test_demo_agents_in_one_process_share_one_runtime_session_each_with_its_own_cache(mosquitto, tmp_path):
    from fedfleet.coordinator.job.run import shards, start_demo_agents
    from tests.support.fleet import SECRET, start_fleet

    fleet = start_fleet(mosquitto.url, tmp_path / "run", start_agents=False, mode="transfer", agents=4, rounds=2)
    local, _ = shards(fleet.cfg)
    ids = sorted(fleet.coord.keys)
    agents: list = []
    try:
        start_demo_agents(fleet.cfg, mosquitto.url, ids, SECRET, local, fleet.coord.public_key, agents)
        assert len(agents) == 4
        fleet.coord.wait_for_agents(4, timeout_s=60)
        models = [a.model for a in agents]
        assert models[0].backbone is not None and models[0].head_runner is not None
        assert len({id(m.backbone) for m in models}) == 1  # one backbone session for the process
        assert len({id(m.head_runner) for m in models}) == 1
        assert len({id(m._cache) for m in models}) == 4  # but a feature cache per agent
        fleet.agents = {a.cfg.agent_id: a for a in agents}
        fleet.run_async(2)
        summaries = fleet.join()
        assert [s.round for s in summaries] == [1, 2]
        assert all(s.ok == 4 for s in summaries)
        caches = [m._cache for m in models]
        assert all(caches) and len({id(next(iter(c.values()))[1]) for c in caches}) == 4
        kept = [a._state_msgs for a in agents]  # the round state broadcasts each agent keeps
        newest = max(kept[0])
        assert all(newest in k for k in kept)
        assert len({id(k[newest][0][1]) for k in kept}) == 1  # one copy of the payload in the process
    finally:
        for a in agents:
            a.stop()
        fleet.coord.stop()


def test_exit_now_keeps_the_exit_work_that_has_effects(tmp_path):
    out = tmp_path / "out.txt"
    r = _run(f"""
        import atexit, sys, threading, time
        from fedfleet.coordinator.job.quick_exit import exit_now
        path = {str(out)!r}
        atexit.register(lambda: open(path, "a").write("atexit\\n"))
        def late():
            time.sleep(0.3)
            open(path, "a").write("thread\\n")
        threading.Thread(target=late).start()  # non-daemon: a normal exit waits for it, so does exit_now
        sys.stdout.write("buffered line without newline")
        exit_now(3)
        print("never")
    """)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "buffered line without newline"
    assert out.read_text() == "thread\natexit\n"


def test_the_command_line_owns_its_process_but_not_a_callers():
    from fedfleet.coordinator import cli

    assert cli.main(["no-such-command"]) == 2  # in-process: a return code, the caller's process lives on
    r = subprocess.run([sys.executable, "-m", "fedfleet.coordinator.cli", "demo", "--agents", "0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "agents" in r.stderr and "Traceback" not in r.stderr


ARENAS = """
import re, sys, threading, time
from pathlib import Path
from fedfleet.coordinator.job.malloc_arenas import cap_malloc_arenas
took = cap_malloc_arenas(2) if sys.argv[1] == "cap" else None
def work():
    kept = [bytearray(4096 + i) for i in range(300)]  # malloc in this thread: it gets an arena
    done.wait()
def heaps():  # a non-main arena's heap: a 64 MiB-aligned anonymous reservation of exactly 64 MiB, its used part
    # read-write and the rest PROT_NONE (a thread stack can start 64 MiB-aligned by chance: it is not 64 MiB)
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\\S+) \\S+ \\S+ \\S+\\s*(.*)$", line)
        if m and not m.group(4):
            maps.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    found = set()
    for i, (start, end, perms) in enumerate(maps):
        if start % (64 << 20) or not perms.startswith("rw"):
            continue
        if end - start == 64 << 20:
            found.add(start)
        elif i + 1 < len(maps) and maps[i + 1][0] == end and maps[i + 1][2].startswith("---") \\
                and maps[i + 1][1] - start == 64 << 20:
            found.add(start)
    return found
before = heaps()
done = threading.Event()
threads = [threading.Thread(target=work) for _ in range(20)]
for t in threads:
    t.start()
time.sleep(0.3)
added = len(heaps() - before)
done.set()
print(took, added)
"""


def test_capping_malloc_arenas_keeps_many_threads_in_few_heaps():
    capped = subprocess.run([sys.executable, "-c", ARENAS, "cap"], capture_output=True, text=True, timeout=60)
    free = subprocess.run([sys.executable, "-c", ARENAS, "free"], capture_output=True, text=True, timeout=60)
    assert capped.returncode == 0 and free.returncode == 0, capped.stderr + free.stderr
    took, capped_heaps = capped.stdout.split()
    assert took == "True"
    assert int(capped_heaps) <= 1  # besides the main arena (brk), at most one more
    assert int(free.stdout.split()[1]) > int(capped_heaps)  # glibc's default: an arena per new thread


def test_an_explicit_malloc_arena_max_is_left_alone(monkeypatch):
    from fedfleet.coordinator.job.malloc_arenas import cap_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cap_malloc_arenas(2) is False


def test_package_cache_gives_the_built_package_and_then_reads_it_without_onnx(tmp_path, monkeypatch):
    from fedfleet.models import package_cache
    from fedfleet.models.package import build_package

    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(tmp_path))
    built = build_package("transfer", head_hidden=32, seed=0)
    assert package_cache.package("transfer", head_hidden=32, seed=0) == built
    assert len(list((tmp_path / "packages").glob("*.zip"))) == 1
    r = _run(f"""
        import os, sys
        os.environ["FEDFLEET_CACHE_DIR"] = {str(tmp_path)!r}
        from fedfleet.models import package_cache
        blob = package_cache.package("transfer", head_hidden=32, seed=0)
        print(package_cache.cache_dir(), len(blob), [m for m in ("onnx", "flatbuffers", "ai_edge_litert", "torch")
                                                    if m in sys.modules])
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "packages"), str(len(built)), "[]"]


def test_package_cache_key_follows_every_argument(tmp_path, monkeypatch):
    from fedfleet.models import package_cache

    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(tmp_path))
    base = {"head_hidden": 32, "seed": 0, "dataset": "digits", "head_layers": 1}
    keys = {package_cache.cache_key("transfer", **base)}
    for change in ({"head_hidden": 16}, {"seed": 1}, {"head_layers": 2}):
        keys.add(package_cache.cache_key("transfer", **{**base, **change}))
    keys.add(package_cache.cache_key("full", **base))
    keys.add(package_cache.cache_key("full", **{**base, "dataset": "mnist"}))
    assert len(keys) == 6
    assert package_cache.package("full", head_hidden=16, seed=3) != package_cache.package("full", head_hidden=16, seed=4)


def test_a_damaged_cached_package_is_built_again(tmp_path, monkeypatch):
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import build
    from fedfleet.edge_agent.wire import protocol

    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(tmp_path))
    cfg = JobConfig(mode="full", seed=5)
    blob, _ = build(cfg)
    (cached,) = (tmp_path / "packages").glob("*.zip")
    cached.write_bytes(b"PK\x03\x04 not a package")
    again, model = build(cfg)
    assert again == blob and cached.read_bytes() == blob  # rebuilt and stored again
    assert model.digest == protocol.digest(blob)


def test_an_unwritable_cache_only_means_no_caching(tmp_path, monkeypatch):
    from fedfleet.models import package_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(blocker))
    assert package_cache.package("full", head_hidden=8, seed=0)[:2] == b"PK"


def test_demo_agents_that_cannot_connect_are_a_connection_error_and_stay_stoppable():
    import pytest

    from fedfleet.coordinator.broker import free_port
    from fedfleet.coordinator.job.config import JobConfig
    from fedfleet.coordinator.job.run import shards, start_demo_agents

    cfg = JobConfig(mode="full", agents=3, alpha=0.0)
    local, _ = shards(cfg)
    agents: list = []
    url = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(ConnectionError, match="agent-00 could not connect"):
        start_demo_agents(cfg, url, ["agent-00", "agent-01", "agent-02"], b"s" * 32, local, b"k" * 32, agents,
                          wait_s=1.0)
    assert len(agents) == 3  # all started, all handed back to be stopped
    for a in agents:
        a.stop()


def test_shared_bytes_keeps_one_copy_of_equal_payloads_and_forgets_old_ones():
    from fedfleet.edge_agent.wire import shared_bytes

    kept = shared_bytes.SharedBytes()
    first = bytes(bytearray(b"state" * 100))
    again = bytes(bytearray(b"state" * 100))
    assert first is not again
    assert kept.shared(first) is first
    assert kept.shared(again) is first
    other = kept.shared(b"other")
    assert other == b"other" and kept.shared(bytes(bytearray(b"other"))) is other
    for i in range(shared_bytes.MAX_KEPT):
        kept.shared(f"filler {i}".encode())
    late = bytes(bytearray(b"state" * 100))
    assert kept.shared(late) is late  # the first copy was forgotten: not kept forever


def test_package_cache_keeps_only_the_newest_builds(tmp_path, monkeypatch):
    import os

    from fedfleet.models import package_cache

    monkeypatch.setenv("FEDFLEET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(package_cache, "KEEP", 2)
    def path(seed: int):  # named by its key and the SHA-256 of its bytes
        key = package_cache.cache_key("full", head_hidden=4, seed=seed, dataset="digits", head_layers=1)
        (found,) = (tmp_path / "packages").glob(f"{key}-*.zip")
        return found

    for seed in range(3):
        package_cache.package("full", head_hidden=4, seed=seed)
        os.utime(path(seed), (1000 + seed, 1000 + seed))  # distinct ages, oldest first
    kept = [path(1), path(2)]
    assert sorted((tmp_path / "packages").glob("*.zip")) == sorted(kept)
