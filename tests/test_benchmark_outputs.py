"""Every benchmark CLI refuses to replace a result file that exists (naming it, before any work) unless given
--overwrite, and writes its JSON atomically."""

from __future__ import annotations

import importlib
import json
import os

import pytest

from benchmarks.output import write_json

# module, its arguments with OUT for the output prefix / file / folder, the file that must not be replaced
CLIS = [("decode", ["--out", "{d}/r"], "{d}/r.json"),
        ("e2e", ["--out", "{d}/r"], "{d}/r.json"),
        ("e2e", ["--out", "{d}/r", "--profile-prefill", "1024"], "{d}/r_profile.json"),
        ("generate", ["--out", "{d}/r.json"], "{d}/r.json"),
        ("kernels", ["--out", "{d}/r"], "{d}/r.json"),
        ("passkey", ["--out", "{d}/r"], "{d}/r.json"),
        ("serve", ["--out", "{d}/r"], "{d}/r.json"),
        ("stage2_memory", ["--out", "{d}/r.json"], "{d}/r.json"),
        ("teacher", ["--out", "{d}/r.json"], "{d}/r.json"),
        ("prefill_selection", ["--out", "{d}/r"], "{d}/r.json"),
        ("stage2_step", ["--out", "{d}/r"], "{d}/r.json"),
        ("scan_probe", ["--roles", "x.json", "--out", "{d}"], "{d}/scan_probe.json")]


IDS = [f"{c[0]}{'-' + c[1][2] if len(c[1]) > 2 else ''}" for c in CLIS]


@pytest.mark.parametrize("module,args,path", CLIS, ids=IDS)
def test_refuses_to_replace_a_result(module, args, path, tmp_path, capsys):
    path = path.format(d=tmp_path)
    with open(path, "w") as f:
        f.write('{"mine": 1}')
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as e:
        main([a.format(d=tmp_path) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert path in err and "--overwrite" in err
    assert json.load(open(path)) == {"mine": 1}


def test_stage2_memory_overwrites_when_asked(tmp_path):
    from benchmarks.stage2_memory import main

    out = str(tmp_path / "m.json")
    write_json(out, {"mine": 1})
    assert main(["--out", out, "--devices", "8", "--overwrite"]) == 0
    assert json.load(open(out))["rows"][0]["devices"] == 8 and not os.path.exists(out + ".tmp")
