"""Two `python -m train.distill` processes on localhost (jax.distributed, 2 CPU devices each, each reading its
own half of every batch) give the same losses as one process with 4 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.runs import losses
import tests.test_distill as _distill

flags, tiny = _distill.flags, _distill.tiny  # tiny: a module fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_two_processes(argv: list[str]) -> list[str]:
    """Run `python <argv>` as 2 jax.distributed processes on localhost (2 CPU devices each); assert both exit 0;
    return their outputs. When one fails the other is stopped at once (it would otherwise wait minutes on
    jax.distributed's shutdown barrier) and both outputs are shown."""
    import tempfile
    import time

    port = _free_port()
    logs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, *argv, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)],
                              cwd=ROOT, env=_env(2), stdout=logs[i], stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for q in procs:
                q.kill()
            for q in procs:
                q.wait()
            if not failed:
                pytest.fail(f"2-process run timed out: {argv}")
            break
        time.sleep(0.2)
    outs = []
    for f in logs:
        f.seek(0)
        outs.append(f.read())
        f.close()
    for p in procs:
        assert p.returncode == 0, "\n=====\n".join(o[-2500:] for o in outs)
    return outs


def test_two_processes_match_one(tiny, tmp_path):
    common = ["--steps", "4", "--eval-passkey", "0", "--batch", "4", "--mesh=-1,1"]
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "train.distill", *flags(tiny, one, *common), "--skip-distributed"],
                   cwd=ROOT, env=_env(4), check=True, capture_output=True, timeout=600)
    two = tmp_path / "two"
    outs = run_two_processes(["-m", "train.distill", *flags(tiny, two, *common)])
    cfg = json.load(open(two / "config.json"))
    assert cfg["devices"] == 4 and cfg["mesh"]["data"] == 4
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * max(1.0, abs(a[step])), (step, a[step], b[step])
    assert os.path.isdir(two / "indexer")
    assert "[distill]" in outs[0] and "[distill]" not in outs[1], "only process 0 logs"


def test_a_failed_process_stops_the_other_at_once():
    """run_two_processes does not wait for the survivor of a failed pair (which would sit on jax.distributed's
    shutdown barrier for minutes): it stops it, then fails showing both outputs."""
    import time

    code = ("import sys, time; pid = sys.argv[sys.argv.index('--process-id') + 1]; print('process', pid, flush=True); "
            "sys.exit(3) if pid == '1' else time.sleep(120)")
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="process 1"):  # the failed one's output is shown
        run_two_processes(["-c", code])
    assert time.monotonic() - t0 < 30
