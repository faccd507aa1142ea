"""The command line in a real process, for tests that signal it (Ctrl-C, SIGTERM)."""
import os
import subprocess
import sys
import time
from pathlib import Path


def start_cli(args):
    """``tinylora ARGS`` in a child process (one BLAS thread), its output captured."""
    code = "import sys; from tinylora.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(metrics: Path, n: int, proc, timeout=90):
    """Until the run's metrics.jsonl logs ``n`` training steps (fails if the process ends)."""
    t = time.time()
    while time.time() - t < timeout:
        if metrics.exists() and metrics.read_text().count('"event": "train"') >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("training made no progress")
