"""Faults with real processes and real file systems: a merge killed with SIGKILL, stopped with
SIGTERM or Ctrl-C, two merges into one output at once, a disk that fills up, a file-size limit,
a read-only output folder. A stopped merge leaves nothing, or only what the next run removes;
a refused one is one line; inputs never change."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hostile import Scene, digest, env, family, fusion_cmd, one_line, Result, scene  # noqa: F401

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

# linear (the C kernels: no torch to import); on its third tensor it says so (a file) and waits
# until the test lets it go on (another file), so that a test catches the merge in the middle of
# writing its output, every time.
GATED_PLUGIN = '''\
import os
import time
from pathlib import Path

import fusion
from fusion.plugins.linear import Linear

calls = 0


class Gated(Linear):
    name = "gated_average"
    description = "linear, pausing at the third tensor (a test plugin)."

    def merge_compiled(self, out, base, tensors, params, context, **kw):
        global calls
        calls += 1
        if calls == 3:
            gate = Path(os.environ["GATE"])
            (gate.parent / "waiting").touch()
            while not gate.exists():
                time.sleep(0.01)
        return super().merge_compiled(out, base, tensors, params, context, **kw)


@fusion.hookimpl
def register_strategies(register):
    register(Gated())
'''


def gated_merge(scene: Scene) -> tuple[subprocess.Popen, Path]:
    """A merge in a subprocess, stopped in the middle of writing its output; the path to create
    to let it finish."""
    plugin = scene.plugin("gated_plugin.py", GATED_PLUGIN)
    cfg = scene.config(f"merge_method: gated_average\nmodels: [{scene.model('chat')}, {scene.model('code')}]\n")
    gate = scene.root / "gate" / "open"
    gate.parent.mkdir()
    argv = ["--plugin", str(plugin), "merge", str(cfg), "-o", str(scene.out), "-q"]
    proc = subprocess.Popen(fusion_cmd(*argv), cwd=scene.cwd, env={**env(), "GATE": str(gate)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (gate.parent / "waiting").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the merge never reached its third tensor"
        time.sleep(0.01)
    return proc, gate


def finish(proc: subprocess.Popen) -> Result:
    out, err = proc.communicate(timeout=90)
    return Result(proc.returncode, out, err)


def test_sigkill_leaves_only_what_the_next_run_removes(scene):
    proc, _ = gated_merge(scene)
    inputs = list(scene.inputs)
    before = digest(*inputs)
    (tmp,) = scene.outs.glob(".merged.fusion-tmp-*")
    assert (tmp / "model.safetensors").is_file()
    proc.send_signal(signal.SIGKILL)
    assert finish(proc).code == -signal.SIGKILL
    assert tmp.is_dir()  # a process killed this way cannot clean up after itself

    res = scene.run("merge", scene.ta(name="rerun.yaml"), "-o", scene.out)  # the next run into the same folder
    assert res.code == 0, res
    assert f"removed {tmp}" in res.out and "did not finish" in res.out
    assert sorted(p.name for p in scene.outs.iterdir()) == ["merged"]
    assert len(load_file(str(scene.out / "model.safetensors"))) == 27
    assert digest(*inputs) == before


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_stop_signal_cleans_up_like_ctrl_c(scene, sig, code, word):
    proc, gate = gated_merge(scene)
    before = digest(*scene.inputs)
    proc.send_signal(sig)
    res = finish(proc)
    one_line(res, "no output was written", code=code, prefix=word)
    gate.parent.joinpath("waiting").unlink()
    gate.parent.rmdir()
    scene.assert_untouched(before)


def test_two_merges_into_one_output(scene):
    """The second merge into a folder another one is writing refuses (with --force too), and
    the first one's result is whole."""
    proc, gate = gated_merge(scene)
    for force in ((), ("--force",)):
        res = scene.run("merge", scene.ta(name=f"second{len(force)}.yaml"), "-o", scene.out, *force)
        one_line(res, str(scene.out), f"being written by another fusion run (process {proc.pid})",
                 "choose another -o")
    gate.touch()
    first = finish(proc)
    assert first.code == 0, first
    assert sorted(p.name for p in scene.outs.iterdir()) == ["merged"]
    assert len(load_file(str(scene.out / "model.safetensors"))) == 27


def _can_mount_in_a_namespace() -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


# Run in a private mount namespace: a 64 KB file system for the output (a full disk), then the
# same file system mounted read-only. Nothing is mounted outside the namespace.
FILE_SYSTEM_SCRIPT = textwrap.dedent("""\
    set -u
    mount -t tmpfs -o size=64k tmpfs "$OUTS" || exit 99
    "$PY" -m fusion merge "$CFG" -o "$OUTS/merged" -q 2> "$LOG/full.err"; echo $? > "$LOG/full.rc"
    ls -A "$OUTS" > "$LOG/full.left"
    mount -o remount,ro "$OUTS" || exit 98
    "$PY" -m fusion merge "$CFG" -o "$OUTS/merged" -q 2> "$LOG/ro.err"; echo $? > "$LOG/ro.rc"
    ls -A "$OUTS" > "$LOG/ro.left"
    """)


@pytest.mark.skipif(not _can_mount_in_a_namespace(), reason="cannot mount a file system in a user namespace")
def test_disk_full_and_read_only_output(scene):
    cfg = scene.ta()
    before = digest(*scene.inputs)
    log = scene.root / "log"
    log.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", FILE_SYSTEM_SCRIPT], capture_output=True, text=True,
                          env={**env(), "OUTS": str(scene.outs), "CFG": str(cfg), "LOG": str(log),
                               "PY": sys.executable}, timeout=180)
    assert proc.returncode == 0, proc
    for case, says in (("full", "no space left on device"), ("ro", "read-only file system")):
        res = Result(int((log / f"{case}.rc").read_text()), "", (log / f"{case}.err").read_text())
        line = one_line(res, f"cannot write the output folder {scene.out}", says, "choose another -o")
        assert "Errno" not in line
        assert (log / f"{case}.left").read_text() == "", case  # nothing left on the small disk
    assert digest(*scene.inputs) == before


def test_file_size_limit(scene):
    """RLIMIT_FSIZE (ulimit -f) below the shard size: the write fails with EFBIG."""
    cfg = scene.ta()
    before = digest(*scene.inputs)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    proc = subprocess.run(fusion_cmd("merge", cfg, "-o", scene.out, "-q"), cwd=scene.cwd, env=env(),
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    one_line(res, f"cannot write the output folder {scene.out}", "file too large", "ulimit -f")
    scene.assert_untouched(before)
