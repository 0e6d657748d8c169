"""How a distributed training process ends, for tests/engine/test_distributed.py (a plugin: a
config names it under ``plugins:``, which imports it before the process group starts).

- With ``VITASKS_TEST_EXIT_PROBE=DIR`` in the environment, an ``atexit`` handler writes
  ``DIR/rank<R>.json`` = ``{"rank", "backend_threads"}``: the c10d backend threads still running
  when the interpreter's teardown begins. Registered before ``init_distributed`` registers its own
  handler, it runs after it (``atexit`` is last in, first out), i.e. it sees what the teardown
  left.
- :class:`FailOnRankHook` raises ``RuntimeError("injected fault ...")`` after training iteration
  ``at_iter`` on rank ``rank`` only: one rank failing while the others go on.
"""

import atexit
import json
import os

from mmengine.hooks import Hook

from vitasks.engine.distributed import backend_threads
from vitasks.registry import HOOKS

_PROBE = os.environ.get("VITASKS_TEST_EXIT_PROBE")


def _record_exit() -> None:
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(_PROBE, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": int(rank), "backend_threads": backend_threads()}, f)


if _PROBE:  # a module runs once per process, however often the config imports it
    atexit.register(_record_exit)


@HOOKS.register_module(force=True)
class FailOnRankHook(Hook):
    """Raises after training iteration ``at_iter`` (1-based) on rank ``rank``."""

    def __init__(self, rank: int = 1, at_iter: int = 2):
        self.rank = rank
        self.at_iter = at_iter

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.rank == self.rank and runner.iter + 1 == self.at_iter:
            raise RuntimeError(f"injected fault on rank {self.rank} at iteration {self.at_iter}")
