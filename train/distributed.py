"""Multi-process start-up. A multi-host run is the same `python -m train` command started once per
host (TPU pod worker, GPU node) or per GPU; `initialize()` joins those processes with
`jax.distributed.initialize` before jax touches a device, deciding from the environment alone:

1. Explicit, for any cluster and for several processes on one machine: `JAX_COORDINATOR_ADDRESS`
   (host:port of process 0; jax reads this name itself), `JAX_NUM_PROCESSES` and
   `JAX_PROCESS_ID` (read here and passed on). `JAX_NUM_PROCESSES=1` means a single process.
2. A cluster JAX detects by itself (jax/_src/clusters): a Cloud TPU VM (the pod's workers come
   from the TPU metadata), SLURM (`srun` with more than one task) or Open MPI (`mpirun` with more
   than one rank).
3. Otherwise a single process: nothing is initialised.

jax itself also reads `JAX_LOCAL_DEVICE_IDS` (the local GPUs this process uses; under SLURM it
defaults to the one GPU numbered SLURM_LOCALID) and `JAX_COORDINATOR_PORT` (the port when the
coordinator's address is detected). CPU processes exchange data through the Gloo collectives.
"""

from __future__ import annotations

import os

import jax

COORDINATOR, NUM_PROCESSES, PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)


def initialize() -> str:
    """Join the other processes of this run, if there are any; returns how the run was set up."""
    explicit = _explicit(os.environ)
    if explicit is not None:
        address, count, index = explicit
        if count == 1:
            return "single process"
        _cpu_collectives()
        jax.distributed.initialize(address, num_processes=count, process_id=index)
        return f"process {index} of {count} ({COORDINATOR}={address})"
    cluster = _detected_cluster(os.environ)
    if cluster is None:
        return "single process"
    _cpu_collectives()
    jax.distributed.initialize()  # coordinator, count and index from the cluster
    return f"process {jax.process_index()} of {jax.process_count()} (detected {cluster})"


def _explicit(env) -> tuple[str | None, int, int] | None:
    """(address, count, index) from the JAX_* variables; None when neither count nor index is
    set; a ValueError naming the variables when they disagree."""
    raw_count, raw_index = env.get(NUM_PROCESSES), env.get(PROCESS_ID)
    if raw_count is None and raw_index is None:
        return None
    if raw_count is None or raw_index is None:
        raise ValueError(
            f"set both {NUM_PROCESSES} and {PROCESS_ID} (got {NUM_PROCESSES}={raw_count!r}, "
            f"{PROCESS_ID}={raw_index!r})"
        )
    try:
        count, index = int(raw_count), int(raw_index)
    except ValueError:
        raise ValueError(
            f"{NUM_PROCESSES}={raw_count!r} and {PROCESS_ID}={raw_index!r} must be integers"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"{PROCESS_ID}={index} must be in [0, {NUM_PROCESSES}={count}) and {NUM_PROCESSES} >= 1"
        )
    address = env.get(COORDINATOR)
    if count > 1 and (not address or ":" not in address):
        raise ValueError(
            f"{NUM_PROCESSES}={count} needs {COORDINATOR}=host:port, the address of process 0 "
            f"(got {address!r})"
        )
    return address, count, index


def _detected_cluster(env) -> str | None:
    """The multi-process cluster jax.distributed.initialize() will detect by itself, if any."""
    if _on_cloud_tpu_vm():
        return "Cloud TPU"
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_STEP_NODELIST" in env:  # inside srun
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
        return "Open MPI"
    return None


def _on_cloud_tpu_vm() -> bool:
    # `import jax` sets this flag when TPU chips are attached and libtpu is installed
    # (jax/_src/cloud_tpu_init.py). No public query exists that would not start the backend,
    # which must not start before jax.distributed.initialize.
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _cpu_collectives() -> None:
    # CPU processes need a cross-process collective implementation chosen before the backend
    # starts; Gloo is jax 0.10's default, set here if a user cleared it.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
