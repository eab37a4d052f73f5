"""Per-process input: which rows of each global batch a process loads, Grain batches of just those
rows, and the global jax.Array assembled from every process's rows.

Every process walks the same stream of example indices (the same seeded shuffle), cuts it into
global batches of `batch_size`, and loads only its rows of each: the rows its devices hold under
the batch sharding. So the global batch is the same whatever the number of processes (a run on
one host and on sixteen sees the same examples in the same order), each example is read by one
process (by each, where processes are replicas of the batch), and every process's Grain iterator
is at the same position.
"""

from __future__ import annotations

from collections.abc import Callable

import grain
import jax
import numpy as np


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
    """Positions in a global batch of `batch_size` rows (axis 0 split by `sharding`) held by this
    process's devices, ascending: the order jax.make_array_from_process_local_data reads them."""
    rows = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows))


def batches(
    indices: grain.MapDataset,
    batch_size: int,
    rows: np.ndarray | None,
    load: Callable[[int], dict[str, np.ndarray]],
) -> grain.MapDataset:
    """Global batches of `batch_size` consecutive entries of `indices` (example indices), of
    which only the `rows` (None: all) are loaded with `load` and stacked: {key: (rows, ...)}."""
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)

    def load_rows(batch_indices):
        examples = [load(int(i)) for i in np.asarray(batch_indices)[rows]]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    return indices.batch(batch_size, drop_remainder=True).map(load_rows)


def global_batch(local, sharding: jax.sharding.Sharding, batch_size: int):
    """The global batch (`batch_size`, ...) from this process's rows of it (`local`, a pytree)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x, (batch_size, *x.shape[1:])),
        local,
    )
