"""A step's planned memory against the machine, checked before the step first runs.

XLA plans every buffer of a compiled program; `compiled.memory_analysis()` gives the sizes per
device. What a step allocates beyond its (already resident) arguments is its temporaries and
the outputs that do not reuse a donated argument. On CPU all local devices share the host's
memory, so their plans add up against /proc/meminfo's MemAvailable; on a GPU or TPU each device
has its own memory (`memory_stats()`: bytes_limit - bytes_in_use). A step that cannot fit is
refused with both numbers and the settings that shrink it, instead of the process dying
(or swapping) minutes later.
"""

from __future__ import annotations

import jax

GB = 1e9
# Room left for what the plan does not count: the input pipeline, host copies, the runtime.
MARGIN = 0.9


def available_bytes(device) -> int | None:
    """Bytes a program on `device` can still allocate: the device's free memory, or on CPU the
    host's MemAvailable; None where neither is known."""
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics
        return None
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def planned_bytes(compiled) -> int | None:
    """Bytes one device allocates while the compiled program runs (temporaries and outputs not
    aliased to a donated argument); None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss, kilobytes on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepGuard:
    """Checks each new shape of a jitted step once, before it first runs: its plan (all local
    devices together on CPU) must fit in what the machine has free. `devices`: how many of this
    process's devices run the step; `advice` names the settings that shrink it; `what` how the
    message names it."""

    def __init__(self, what: str, advice: str, devices: int, limit_bytes: int = 0):
        self.what, self.advice, self.devices = what, advice, devices
        self.limit = limit_bytes  # >0: the user's limit instead of what is free
        self.seen: set = set()

    def check(self, jitted, *args, shape_of=None) -> None:
        """Compile `jitted` for `args` (jax keeps the executable, so the call that follows does
        not compile again) and raise ValueError if its plan does not fit. `shape_of`: the part
        of args whose shapes tell steps apart (default: all of them)."""
        leaves = jax.tree.leaves(args if shape_of is None else shape_of)
        key = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
        if key in self.seen:
            return
        self.seen.add(key)
        need = planned_bytes(jitted.lower(*args).compile())
        if need is None:
            return
        device = jax.local_devices()[0]
        if device.platform == "cpu":  # the local devices share the host's memory
            need *= self.devices
        if self.limit:
            allowed, have = self.limit, f"memory_limit_gb is {self.limit / GB:g}"
        else:
            free = available_bytes(device)
            if free is None:
                return
            where = "this host" if device.platform == "cpu" else f"each {device.device_kind}"
            allowed, have = MARGIN * free, f"{where} has {free / GB:.3g} GB free"
        if need > allowed:
            raise ValueError(
                f"{self.what} needs {need / GB:.3g} GB ({_shapes(shape_of)}) but {have}; "
                f"{self.advice}"
            )


def _shapes(tree) -> str:
    """The largest array of a batch, e.g. "latents (16, 13, 16, 28, 16)"."""
    if not isinstance(tree, dict) or not tree:
        return "as XLA plans it"
    name = max(tree, key=lambda k: tree[k].size)
    return f"batch {name} {tuple(tree[name].shape)}"
