"""Launching test workers the way a user launches a job: ``python -m torch.distributed.run`` (torchrun) for
several processes, plain ``python`` for one. Test modules import it as ``dist_launch`` (pytest puts this
folder on sys.path for tests/conftest.py)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, fails: bool = False, timeout: int = 300) -> None:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) on ``nproc`` processes, one OpenMP
    thread each, with the repo importable; assert it exited 0 (or, with ``fails``, that it did not)."""
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode != 0) if fails else (proc.returncode == 0), proc.stderr[-3000:]
