"""stop_group ends a child and its own children, and leaves a finished process alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from projects.ablation.process import stop_group


def test_stop_group_ends_the_child_and_its_children(tmp_path):
    pidfile = tmp_path / "grandchild"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    while not pidfile.exists() or not pidfile.read_text():
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    stop_group(proc, grace_s=5)
    assert proc.returncode is not None
    for _ in range(100):  # the grandchild is reaped by init once killed
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the grandchild survived stop_group")


def test_stop_group_leaves_a_finished_process_alone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    stop_group(proc)  # no signal to a reused process group id
    assert proc.returncode == 0
