"""A checkpoint save killed at random moments (SIGKILL: no handler, no cleanup runs) never
damages the checkpoint: it restores bitwise to one of the two contents the dying process
alternated between, with that content's own metadata. The temporary file the killed save
may leave behind is removed by the next save of the same target, and nothing else is.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from funcnet import checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL"),
]

TRIALS = 6
BUDGET_S = 20.0  # stop adding trials after this (at least 3 always run)
# what a save of run.ckpt writes: checkpoint._tmp_prefix("run.ckpt"), 8 random characters
TEMPORARY = re.compile(re.escape(checkpoint._tmp_prefix("run.ckpt")) + r"[a-z0-9_]{8}\.tmp")

# Shared by the test and the child process, so both build the same two trees.
TREES = textwrap.dedent(
    """
    import numpy as np

    def make_tree(which):
        rng = np.random.default_rng(which)
        return {
            "w": rng.standard_normal((2048, 2048)).astype(np.float32),  # 16 MiB
            "b": rng.standard_normal(4096),
            "steps": np.arange(which, which + 1000, dtype=np.int64),
        }
    """
)

CHILD = TREES + textwrap.dedent(
    """
    import sys
    from funcnet import checkpoint

    path = sys.argv[1]
    trees = [make_tree(0), make_tree(1)]
    print("ready", flush=True)
    i = 0
    while True:  # saves until killed
        checkpoint.save(path, trees[i % 2], metadata={"which": i % 2, "i": i})
        i += 1
    """
)


def _make_trees():
    scope: dict = {}
    exec(TREES, scope)
    return [scope["make_tree"](0), scope["make_tree"](1)]


def _bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.asarray(a[k]).dtype == b[k].dtype
        and np.asarray(a[k]).shape == b[k].shape
        and np.asarray(a[k]).tobytes() == b[k].tobytes()
        for k in a
    )


def test_a_save_killed_at_random_moments_never_damages_the_checkpoint(tmp_path):
    trees = _make_trees()
    target = tmp_path / "run.ckpt"
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    checkpoint.save(target, trees[0], metadata={"which": 0, "i": -1})
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    rng = random.Random(1234)
    start = time.monotonic()
    left_temporaries = 0
    log = []
    for trial in range(TRIALS):
        if trial >= 3 and time.monotonic() - start > BUDGET_S:
            break
        with open(tmp_path / "child.err", "w+b") as err:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(target)],
                stdout=subprocess.PIPE, stderr=err, env=env, text=True,
            )
            try:
                line = child.stdout.readline()
                if line.strip() != "ready":
                    child.kill()
                    child.wait()
                    err.seek(0)
                    pytest.fail(f"the saving process did not start: {err.read().decode()}")
                delay = rng.uniform(0.02, 0.5)
                time.sleep(delay)
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=30)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        (tmp_path / "child.err").unlink()

        names = set(os.listdir(tmp_path))
        temporaries = sorted(n for n in names if TEMPORARY.fullmatch(n))
        left_temporaries += bool(temporaries)
        log.append((trial, round(delay, 3), temporaries))
        # Only the target, the unrelated file and at most the killed save's temporary.
        assert names - set(temporaries) == {target.name, unrelated.name}, log
        assert len(temporaries) <= 1, log

        # The checkpoint is whole: exactly one of the two contents, with its own metadata.
        restored, meta = checkpoint.restore(target, trees[0])
        assert meta["which"] in (0, 1), log
        assert _bitwise_equal(restored, trees[meta["which"]]), (meta, log)
        assert not _bitwise_equal(restored, trees[1 - meta["which"]])

        # The next save removes the stale temporary and nothing else.
        checkpoint.save(target, trees[0], metadata={"which": 0, "i": -1})
        assert sorted(os.listdir(tmp_path)) == sorted([target.name, unrelated.name]), log
        assert unrelated.read_text() == "keep me"
    print(f"{len(log)} kills, {left_temporaries} left a temporary file: {log}")
