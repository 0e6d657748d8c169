"""Fault injection for the reproducibility tests, loaded as a plugin (``plugins:`` in a config).

- :class:`ProgressHook` appends each finished training iteration to a file (and can slow the
  loop down a little), so a test can kill the process at a moment of its choosing.
- With ``VITASKS_TEST_KILL_IN_SAVE=N`` in the environment, the N-th checkpoint file written in
  this process gets half of its bytes and then the process SIGKILLs itself: a kill during a save.
"""

import os
import signal
import time

from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import Hook

from vitasks.registry import HOOKS


@HOOKS.register_module()
class ProgressHook(Hook):
    """Appends ``runner.iter`` (after the iteration) to ``path``; sleeps ``delay`` s first."""

    def __init__(self, path: str, delay: float = 0.0):
        self.path = path
        self.delay = delay

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.delay:
            time.sleep(self.delay)
        with open(self.path, "a") as f:
            f.write(f"{runner.iter}\n")


_KILL_AT = int(os.environ.get("VITASKS_TEST_KILL_IN_SAVE", "0"))
_saves = 0
_put = LocalBackend.put


def _put_then_die(self, obj, filepath):
    """LocalBackend.put that dies half-way through the ``_KILL_AT``-th checkpoint."""
    global _saves
    if isinstance(obj, bytes) and str(filepath).endswith((".pth", ".pth.tmp")):
        _saves += 1
        if _saves == _KILL_AT:
            with open(filepath, "wb") as f:
                f.write(obj[: len(obj) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return _put(self, obj, filepath)


if _KILL_AT:
    LocalBackend.put = _put_then_die
