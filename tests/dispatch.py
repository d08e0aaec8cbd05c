"""What the dispatcher sees: the ops a call reaches under a recording TorchDispatchMode."""

from torch.utils._python_dispatch import TorchDispatchMode


def dispatched_ops(fn) -> list[str]:
    """Names of the ops ``fn()`` dispatches (a dispatch mode is on, so fast paths must step aside)."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen
