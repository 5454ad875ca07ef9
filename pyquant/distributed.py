"""Where independent pieces of work run: in this process one after another, or as Ray
tasks (on this machine or on an existing cluster). The search's trials, the shards of a
calibration pass and the shards of an evaluation all go through one ``Executor``, so the
same code runs with or without Ray and gives the same results (each piece is a pure
function of its arguments; only where it runs changes).

Ray is optional (``pip install 'pyquant[distributed]'``): without it only the in-process
executor exists, and asking for Ray is a ConfigError that says how to get it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

from .errors import ConfigError, PyquantError

try:  # an optional dependency: the package imports and runs without it
    import ray
    import ray.exceptions
except ImportError:  # pragma: no cover - depends on the environment
    ray = None

log = logging.getLogger(__name__)


def ray_available() -> bool:
    return ray is not None


class LocalExecutor:
    """Runs each call in this process, in order. ``cpus_per_task`` is recorded (the
    callers give each piece that many threads) but one piece runs at a time."""

    name = "in-process"

    def __init__(self, cpus_per_task: Optional[int] = None) -> None:
        self.cpus_per_task = cpus_per_task

    @property
    def parallelism(self) -> int:
        return 1

    def map_unordered(self, function: Callable, argument_lists: Sequence[Tuple]) -> Iterator[Tuple[int, Any]]:
        """(index, function(*arguments)) for each argument tuple, as each finishes."""
        for index, arguments in enumerate(argument_lists):
            yield index, function(*arguments)

    def shared(self, value: Any) -> Any:
        """A handle to a large argument passed to many calls (Ray stores it once)."""
        return value

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs each call as a Ray task asking for ``cpus_per_task`` CPUs, so that Ray never
    starts more tasks on a node than it has CPUs for (two trials on 2 cores, not eight).

    ``address``: None is ``ray.init()``'s default (the cluster started with ``ray start`` on
    this machine if there is one, else a new local instance); "local" always a new local
    instance; "auto" the cluster started on this machine (an error if there is none);
    "host:port" or ``ray://host:port`` another one.
    A Ray instance that is already initialised (a test fixture, the caller's own) is used
    as it is and left running; one started here is shut down by ``close()``."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, cpus_per_task: int = 1) -> None:
        if ray is None:
            raise ConfigError("running on Ray needs the ray package: pip install 'pyquant[distributed]'")
        if isinstance(cpus_per_task, bool) or not isinstance(cpus_per_task, int) or cpus_per_task < 1:
            raise ConfigError(f"cpus_per_task must be a positive integer, got {cpus_per_task!r}")
        self.cpus_per_task = cpus_per_task
        self._owns = not ray.is_initialized()
        if self._owns:
            try:
                # a new local instance without the dashboard (a web server nobody asked for);
                # an existing cluster's settings are its own
                local = {"include_dashboard": False} if address is None else {}
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **local)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"cannot connect to Ray at {address or 'a new local instance'}: {e}") from None
        elif address is not None:
            log.info("Ray is already initialised; using it instead of --address %s", address)

    @property
    def parallelism(self) -> int:
        """Tasks that can run at once: the cluster's CPUs over the CPUs each task takes."""
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // self.cpus_per_task)

    def map_unordered(self, function: Callable, argument_lists: Sequence[Tuple]) -> Iterator[Tuple[int, Any]]:
        remote = ray.remote(num_cpus=self.cpus_per_task, max_retries=0)(function)
        pending = {remote.remote(*arguments): index for index, arguments in enumerate(argument_lists)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                index = pending.pop(ref)
                yield index, _get(ref)
        finally:
            for ref in pending:  # an error or an interruption: do not leave work running
                ray.cancel(ref, force=True)

    def shared(self, value: Any) -> Any:
        return ray.put(value)

    def close(self) -> None:
        if self._owns and ray.is_initialized():
            ray.shutdown()


def _get(ref) -> Any:
    """The task's result; a PyquantError raised in the task is raised here as itself
    (one line for the CLI), not wrapped in Ray's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
        if isinstance(cause, PyquantError):
            raise cause from None
        raise


def make_executor(use_ray: Optional[bool] = None, address: Optional[str] = None,
                  cpus_per_task: int = 1):
    """Ray when asked for (``use_ray=True`` or an ``address``), or when ``use_ray`` is None
    and Ray is installed; otherwise in-process."""
    if use_ray is False:
        if address is not None:
            raise ConfigError("an address was given together with in-process execution")
        return LocalExecutor(cpus_per_task)
    if use_ray is None and address is None and ray is None:
        return LocalExecutor(cpus_per_task)
    return RayExecutor(address, cpus_per_task)


def resolve_shared(value: Any) -> Any:
    """Inside a task: the value behind an executor's ``shared()`` handle (Ray passes
    top-level object refs already resolved; this resolves nested ones)."""
    if ray is not None and isinstance(value, ray.ObjectRef):
        return ray.get(value)
    return value
