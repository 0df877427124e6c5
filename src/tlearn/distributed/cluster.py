"""Joining a Ray cluster for one job: an existing one (`auto` or an address), or a local one sized to this machine."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from tlearn.errors import MissingExtra

# Read tasks only move bytes from storage into the object store: a quarter of a core each leaves the cores to the
# actors that decode and run the engine, and lets reads go on while every actor is busy.
READ_CPUS = 0.25
# Files per read task: blocks of a fixed size whatever the job's size (Ray would otherwise split the files into a fixed
# number of tasks, whose blocks, and the memory of the tasks and actors holding them, grow with the file count). Each
# block is one call of an actor: 64 files (two batches) ran at 105-110 img/s after start-up on 2 cores (Zen 4), 32 at
# 94 (twice the calls, tasks and bookkeeping), 128 at 109-113 but with the first rows 1.5 s later.
FILES_PER_READ = 64
# A local cluster keeps its idle workers for the job: by default Ray stops a worker idle for 1 s once it has more
# workers than cores (the actors count), so the read worker, idle while the budget below holds reads back, was
# stopped and a new one started (~2.5 s of CPU each) every ~10 s: six read workers in a 5,000-image job, one now.
KEEP_IDLE_WORKERS_MS = 3_600_000
# Object-store memory a job may fill per core of the cluster (Ray Data's budget for blocks in flight: bytes read and
# not yet predicted, rows not yet written), as the actors' appetite for bytes grows with their cores. Ray Data's
# default is half the object store, 30% of RAM on a local cluster: the reads then ran ahead of the actors by
# hundreds of MiB, and a job's memory grew with its size (+33% RSS from 5,000 to 20,000 images). 64 MiB per core is
# ~1,000 photos of 60 KB per core read ahead: on 2 cores the actor kept three batches in flight as with no budget
# (at 8 and 16 MiB per core it waited for bytes).
BUDGET_PER_CORE = 64 << 20
# The object store of a cluster started here, in budgets: room for the job's blocks and Ray's own objects.
LOCAL_STORE_BUDGETS = 4


@dataclass(frozen=True)
class Cluster:
    address: str  # what the job was started with: "local" (started here), "auto" or an address
    cores: int  # CPUs the cluster offers (every node)
    nodes: int

    @property
    def cores_per_node(self) -> int:
        """Cores of an average node: the threads each node's actor decodes and runs the engine with."""
        return max(1, self.cores // max(1, self.nodes))


def actor_pool(cluster: Cluster) -> dict:
    """map_batches settings for one actor per node holding that node's cores (less the read tasks' share), each
    running a batch per core plus one at once, in threads: the engine runs each batch whole on one of its streams
    (Predictor.probabilities(concurrent=True); OpenVINO makes about a stream per core or two) while the other
    batches decode, as the single-machine pipeline keeps its streams busy, so an actor keeps its node busy with one
    copy of the model. (Two batches at once, each split across both streams, ran at 69% of the single-machine
    rate on 2 cores; whole batches, three at once, at the single-machine rate, measured in one process.)"""
    ray = require_ray()
    pool = ray.data.ActorPoolStrategy(size=cluster.nodes, max_concurrent_calls_per_actor=cluster.cores_per_node + 1,
                                      enable_true_multi_threading=True)
    return {"compute": pool, "num_cpus": max(READ_CPUS, cluster.cores_per_node - READ_CPUS)}


def read_images(files: Sequence[str]):
    """A Ray dataset of the raw bytes and paths of `files` (local paths every node reads, or URIs)."""
    ray = require_ray()
    return ray.data.read_binary_files(list(files), include_paths=True, num_cpus=READ_CPUS,
                                      override_num_blocks=max(1, -(-len(files) // FILES_PER_READ)))


def require_ray():
    """The ray module, or MissingExtra saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs both; a bare `ray` without data is not enough)
    except ImportError:
        raise MissingExtra("--ray needs Ray Data: pip install 'tlearn[ray]'") from None
    return ray


@contextmanager
def ray_cluster(address: str | None = None, progress: bool = False) -> Iterator[Cluster]:
    """Connect for the time of a job; disconnect (and stop a local cluster) after it. A driver already connected
    (ray.init called by the caller) is used as it is and left connected.

    `address`: None or "local" starts a local cluster with this machine's cores; "auto" joins the cluster this
    machine belongs to (`ray start`); "ray://host:10001" or "host:6379" joins that one."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        settings = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": progress}
        if address in (None, "", "local"):
            cores = os.cpu_count() or 1
            ray.init(num_cpus=cores, object_store_memory=LOCAL_STORE_BUDGETS * BUDGET_PER_CORE * cores,
                     _system_config={"idle_worker_killing_time_threshold_ms": KEEP_IDLE_WORKERS_MS}, **settings)
        else:
            ray.init(address=address, **settings)
    if not progress:  # Ray Data logs each execution's plan and end at INFO
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.print_on_execution_start = progress
    limits = context.execution_options.resource_limits
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cluster = Cluster(address or "local", int(ray.cluster_resources().get("CPU", 0)), len(nodes))
        if limits.object_store_memory == float("inf"):  # not set by a caller that set up Ray Data itself
            context.execution_options.resource_limits = limits.copy(object_store_memory=BUDGET_PER_CORE * cluster.cores)
        yield cluster
    finally:
        context.execution_options.resource_limits = limits  # the budget was this job's
        if started:
            ray.shutdown()
