"""Counting stand-ins for functions a test needs to see called (or not), and hooks that seem to come from
another package."""


def as_from(package: str, hook):
    """``hook`` as if defined in ``package`` (a sharding or offloading wrapper's, say, or a user's)."""
    hook.__module__ = package
    return hook


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` (a module or class attribute) with a wrapper that appends to the returned list
    on every call and then calls the original; undone with ``monkeypatch``."""
    calls: list = []
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


#: The modules whose launchers launch mmfast's Triton kernels.
KERNEL_MODULES = ("norm", "_common", "adapter", "swiglu", "quick_gelu")


def triton_kernels() -> list:
    """(module, name, kernel) for every Triton kernel the launchers' modules define (``mmfast.kernels``)."""
    import importlib

    found = []
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"mmfast.kernels.{module}")
        found += [(mod, name, obj) for name, obj in vars(mod).items()
                  if name.endswith("_kernel") and hasattr(obj, "__getitem__")]
    return found
