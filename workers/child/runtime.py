"""The per-process serving state of a worker's pool child: warm-up, memory pool, model cache, loader.

Lives only in the pool child (CUDA never touches the forking parent). After every change it calls its
``on_change`` hook; the worker publishes a snapshot from there (:mod:`gpufleet.workers.common.context`) for the parent's
control commands. Changes to what the worker holds (loads, evictions, unloads, readiness) are published at once, inside
the job that made them; a job's own bookkeeping (the running job, the counters) is published in the background
once the worker goes quiet (:class:`gpufleet.workers.child.job_accounting.DeferredCall`), so a job on a resident model
writes no file. What to do about a device out-of-memory error is not decided here but in
:mod:`gpufleet.workers.child.oom_policy`: the runtime only offers :meth:`WorkerRuntime.relieve_memory`.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gpufleet.gpu.errors import BudgetExceededError, GpuError
from gpufleet.gpu.plan.checkpoint_files import read_config
from gpufleet.gpu.repository import ResolvedModel, list_models, resolve_model
from gpufleet.gpu.runtime.device_map import DeviceMapLoader, plan_device_map
from gpufleet.gpu.runtime.device_memory import configure_allocator
from gpufleet.gpu.runtime.loader import FastSafetensorsLoader, ModelLoader
from gpufleet.gpu.runtime.memory_pool import GPUMemoryPool
from gpufleet.gpu.runtime.model import LoadedModel
from gpufleet.gpu.runtime.model_cache import ModelCache
from gpufleet.gpu.runtime.parking import ParkedStore
from gpufleet.gpu.runtime.quantization import check_quantized
from gpufleet.gpu.runtime.warmup import GPUWarmupManager
from gpufleet.gpu.units import dtype_bytes
from gpufleet.tasks.contracts import LoadAction
from gpufleet.tasks.settings import Settings
from gpufleet.workers.child.faults import Faults
from gpufleet.workers.child.generation_stats import GenerationStats
from gpufleet.workers.child.job_accounting import DeferredCall
from gpufleet.workers.common.identity import WorkerIdentity

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
# Upper bounds (seconds) of the load-time histogram the heartbeat carries to /metrics: a parked restore takes
# tenths of a second, a demo model about one, a large checkpoint from cold storage minutes.
LOAD_S_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# A job's start and end reach the snapshot once the worker has been quiet this long (a job of a few milliseconds
# is never shown running; the next heartbeat is seconds away anyway), and at the latest JOB_STATE_MAX_DELAY_S
# after the first unpublished one (a steady stream of jobs still publishes a few times a second).
JOB_STATE_QUIET_S = 0.2
JOB_STATE_MAX_DELAY_S = 1.0
# After a parallel region, torch's OpenMP threads spin waiting for the next one: libgomp 300,000 pause loops by
# default, Intel's runtime 200 ms. After a forward that spin keeps a core busy that the job's own result handling,
# the worker's parent and the broker need (measured on a 2-core CPU worker after a one-sentence MiniLM forward:
# 8.6 ms of CPU burnt in the next 20 ms; 0.06 ms with these bounds). The bounds keep the spin between the
# back-to-back regions of one forward, so an idle machine computes as fast as before. An operator's own
# OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME wins (PASSIVE is faster still on a CPU worker that shares its
# cores with other busy processes, slower on an idle one).
OPENMP_SPIN_DEFAULTS: dict[str, str] = {"GOMP_SPINCOUNT": "20000", "KMP_BLOCKTIME": "1"}


@dataclass(frozen=True)
class Acquired:
    """A model ready to answer, and how it got there."""

    loaded: LoadedModel
    action: LoadAction
    load_s: float
    evicted: tuple[str, ...] = ()


def choose_dtype(identity: WorkerIdentity, settings: Settings) -> str:
    """The dtype models are served in: the configured precision, or bf16/fp16 on GPU and fp32 on CPU."""
    precision = settings.gpu.precision.value
    explicit = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if precision in explicit:
        return explicit[precision]
    if identity.device == "cpu":
        return "float32"
    import torch

    # No bf16 before Ampere (T4 is Turing): fall back to fp16 there.
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def preimport_model_code(settings: Settings) -> list[str]:
    """Import transformers' modeling code for every architecture under the model root (and llama's).

    The first import of a modeling module costs seconds (measured: 3.8 s for BERT's on a 2-core CPU VM, then
    0.02 s for the next family), which would otherwise land on the first user's job. Returns the model
    types imported.
    """
    import importlib

    import transformers  # noqa: F401

    model_types = {"llama"}
    if settings.model_root is not None:
        for model_id in list_models(settings.model_root):
            try:  # read_config caches the parse: the first load of each model reads it from there
                config = read_config(settings.model_root / model_id / "config.json")
            except GpuError:
                continue
            if isinstance(config.get("model_type"), str):
                model_types.add(config["model_type"].replace("-", "_"))
    imported = []
    for model_type in sorted(model_types):
        try:
            importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:  # custom or renamed architectures load (and import) on first use
            continue
        imported.append(model_type)
    return imported


def quiet_progress_bars() -> None:
    """Turn off transformers' (and huggingface_hub's) progress bars in this process.

    A load through ``from_pretrained`` draws a "Loading weights" bar on stderr, which Celery redirects to the log
    at WARNING: a warning per load that warns of nothing. The load's progress is already the job's
    ``PROGRESS`` state (``gpufleet load`` draws it), and its time is in the result.
    """
    from transformers.utils import logging as transformers_logging

    switches: Any = transformers_logging  # its switches are untyped
    switches.disable_progress_bar()


def bound_openmp_spin() -> bool:
    """Bound how long OpenMP threads spin after a parallel region (:data:`OPENMP_SPIN_DEFAULTS`).

    The OpenMP runtime reads these variables when torch loads it, so this works only before the first torch
    import in the process (the pool child's, at start-up: the worker's parent never imports torch).

    Returns:
        Whether it was in time (torch not imported yet).
    """
    if "torch" in sys.modules:
        return False
    if "OMP_WAIT_POLICY" not in os.environ:  # an explicit GOMP_SPINCOUNT would override the operator's policy
        for name, value in OPENMP_SPIN_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return True


def default_loader(settings: Settings) -> ModelLoader:
    """The fast safetensors loader; it falls back to ``from_pretrained`` for what it does not handle."""
    return FastSafetensorsLoader(trust_remote_code=settings.trust_remote_code)


class WorkerRuntime:
    """Everything a pool child needs to serve jobs on its device."""

    def __init__(
        self,
        identity: WorkerIdentity,
        settings: Settings,
        *,
        loader: ModelLoader | None = None,
        faults: Faults | None = None,
        on_change: Callable[[WorkerRuntime], None] | None = None,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.device = identity.device
        self.faults = faults or Faults.from_settings(settings)
        self.on_change = on_change
        self.idle_ttl_s = settings.gpu.memory_pool.idle_ttl_s
        # Several GPUs: each model gets a device map planned from what every GPU has free (gpu.runtime.device_map).
        self.loader = loader or (default_loader(settings) if identity.gpu_count == 1 else self._device_map_loader())
        self.started_at = time.time()
        self.ready = False
        self.ready_at: float | None = None
        self.warmup_report: dict[str, Any] | None = None
        self.preimported: list[str] = []
        self.dtype = "float32"
        self.pool: GPUMemoryPool | None = None
        self.cache: ModelCache[LoadedModel] | None = None
        self.warmup: GPUWarmupManager | None = None
        self.parked: ParkedStore | None = None
        self.jobs_done = 0
        # What the heartbeat publishes: the running job (id, task, model, started_at) and counters since this
        # child started, jobs by "task|outcome" and disk/parked loads as a cumulative histogram (LOAD_S_BUCKETS).
        self.current_job: dict[str, Any] | None = None
        self.jobs_by_outcome: dict[str, int] = {}
        self.load_s_buckets: dict[str, int] = {str(bound): 0 for bound in (*LOAD_S_BUCKETS, "+Inf")}
        self.load_s_sum = 0.0
        self.generation = GenerationStats()  # the continuous-batching engine's figures, by model
        # Held while a job uses the device (and by acquire itself), so idle expiry never evicts a model that is
        # being loaded, checked or run. Re-entrant: a job holds it around its own acquire.
        self._serving = threading.RLock()
        self._stop = threading.Event()
        self._expiry: threading.Thread | None = None
        # One publish at a time: the job, the idle-expiry thread and the deferred publisher all call changed().
        self._publishing = threading.Lock()
        self.job_state = DeferredCall(
            self.changed, quiet_s=JOB_STATE_QUIET_S, max_delay_s=JOB_STATE_MAX_DELAY_S, name="gpufleet-job-state"
        )

    # -- start-up -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Warm the device up and preload priority models; afterwards the worker may consume jobs."""
        if not bound_openmp_spin():
            log.debug("torch was imported before the runtime started: OpenMP spin bounds not applied")
        if self.device != "cpu":
            configure_allocator()  # before the first CUDA allocation
        self.dtype = choose_dtype(self.identity, self.settings)
        # The cache is the one record of resident bytes; the pool reads it to check reservations against.
        self.pool = GPUMemoryPool.from_config(
            self.device,
            self.settings.gpu,
            resident_bytes=lambda: 0 if self.cache is None else self.cache.used_bytes,
            devices=self.identity.devices,  # several GPUs: the budget of each, summed
        )
        self.cache = ModelCache(self.pool.budget_bytes, idle_ttl_s=self.idle_ttl_s, on_evict=self._on_evict)
        self.warmup = GPUWarmupManager(self.device, self.settings.gpu.warmup, dtypes=(self.dtype,))
        self.parked = self._make_parked_store()
        if self.settings.gpu.warmup.enabled and self.settings.gpu.warmup.on_startup:
            self.warmup_report = self.warmup.warm_up().to_dict()
        self.preimported = preimport_model_code(self.settings)
        quiet_progress_bars()  # transformers is imported now; before any load, priority models' included

        self.faults.delay("warmup")
        for model_id in self.settings.priority_models:
            self.acquire(model_id, pinned=True)
        self.ready = True
        self.ready_at = time.time()
        self._start_expiry()
        self.changed()

    def _make_parked_store(self) -> ParkedStore | None:
        host_budget_bytes = self.settings.gpu.memory_pool.host_budget_bytes
        if host_budget_bytes > 0 and self.identity.gpu_count > 1:
            # A restore puts a model back on one device; a model split by a device map must come back split.
            log.warning(
                "the parked tier is off on a worker of %d GPUs: evicted models reload from disk",
                self.identity.gpu_count,
            )
            return None
        return ParkedStore(host_budget_bytes) if host_budget_bytes > 0 else None

    def _device_map_loader(self) -> ModelLoader:
        trust = self.settings.trust_remote_code
        return DeviceMapLoader(self.gpu_free_budgets, single=default_loader(self.settings), trust_remote_code=trust)

    def gpu_free_budgets(self) -> list[int]:
        """What each GPU may still take: its budget less what resident models hold on it.

        Returns:
            One byte count per GPU (never negative), from each resident model's ``extra["device_bytes"]``
            (a model without one counts whole on GPU 0).

        Raises:
            RuntimeError: :meth:`start` has not run.
        """
        pool, cache, _ = self._require()
        free = list(pool.device_budgets_bytes)
        for entry in cache.entries():
            loaded = cache.peek(entry["key"])
            held = {} if loaded is None else loaded.extra.get("device_bytes", {0: loaded.bytes})
            for index, n_bytes in held.items():
                free[index] -= n_bytes
        return [max(0, n_bytes) for n_bytes in free]

    def _fits_gpus(self, resolved: ResolvedModel, *, empty: bool) -> bool:
        """Whether the model's device map fits the GPUs (True on one GPU, where the summed budget is the budget).

        Raises:
            BudgetExceededError: ``empty`` and the model does not fit even GPUs holding nothing.
        """
        if self.identity.gpu_count == 1:
            return True
        pool, _, _ = self._require()
        budgets = list(pool.device_budgets_bytes) if empty else self.gpu_free_budgets()
        try:
            plan_device_map(resolved.path, self.dtype, budgets, trust_remote_code=self.settings.trust_remote_code)
        except BudgetExceededError:
            if empty:
                raise
            return False
        return True

    # -- models -------------------------------------------------------------------------------------------

    def resolve(self, model_id: str) -> ResolvedModel:
        return resolve_model(model_id, self.settings.model_root, self.settings.hf_cache_dir)

    def _require(self) -> tuple[GPUMemoryPool, ModelCache[LoadedModel], GPUWarmupManager]:
        if self.pool is None or self.cache is None or self.warmup is None:
            raise RuntimeError("WorkerRuntime.start() has not run")
        return self.pool, self.cache, self.warmup

    def estimate_bytes(self, resolved: ResolvedModel) -> int:
        """Bytes the model will take on the device, before loading (the measured size is committed after)."""
        from gpufleet.gpu.checkpoint_format import weight_files
        from gpufleet.gpu.plan.estimate import estimate_weights_bytes
        from gpufleet.gpu.plan.specs import load_spec

        try:
            return estimate_weights_bytes(load_spec(resolved.path), dtype_bytes=dtype_bytes(self.dtype))
        except GpuError as exc:  # an unplannable config may still load: size it from the files on disk
            size = sum(f.stat().st_size for f in weight_files(resolved.path).present)
            log.info("cannot plan %s (%s); reserving its %d bytes on disk", resolved.model_id, exc, size)
            return size

    def acquire(
        self, model_id: str, *, pinned: bool = False, progress: ProgressFn | None = None, jobs: int = 1
    ) -> Acquired:
        """The model, from the cache, the parked tier or disk, with room made for it.

        ``jobs`` is how many jobs this serves: the cache counts that many hits (or misses), 0 for a re-acquire
        of the same jobs.

        Raises:
            gpu errors: ModelNotFoundError, UnsafeModelIdError, BudgetExceededError (incl. AllPinnedError),
            DeviceOutOfMemoryError (no retry here: :mod:`gpufleet.workers.child.oom_policy` decides), ModelLoadError.
        """
        with self._serving:
            return self._acquire(model_id, pinned=pinned, progress=progress, jobs=jobs)

    def holds(self, model_id: str, loaded: LoadedModel) -> bool:
        """Whether ``loaded`` is still the resident copy of ``model_id`` (not evicted since it was acquired)."""
        return self.cache is not None and self.cache.peek(model_id) is loaded

    def _acquire(self, model_id: str, *, pinned: bool, progress: ProgressFn | None, jobs: int) -> Acquired:
        pool, cache, warmup = self._require()
        cached = cache.get(model_id, jobs=jobs)
        if cached is not None:
            if pinned:
                cache.pin(model_id)
                self.changed()  # the caller may check the pin as soon as it has the result
            return Acquired(cached, "already-loaded", 0.0)
        resolved = self.resolve(model_id)
        # Refuse a quantized checkpoint this device cannot run before room is made for it (nothing evicted).
        check_quantized(model_id, resolved.path, self.device)
        started = time.perf_counter()
        loaded, action, evicted = self._load(resolved, progress)
        load_s = time.perf_counter() - started
        self._count_load(load_s)
        try:
            evicted += cache.put(model_id, loaded, loaded.bytes, pinned=pinned, load_s=load_s)
        except BaseException:
            # Measured bigger than estimated and the rest is pinned: the load is refused, its reservation too.
            pool.release(model_id)
            loaded.module = None
            raise
        pool.commit(model_id, loaded.bytes)
        self.faults.arm("load", model_id, loaded.module)  # fires on the check forward below
        if self.settings.gpu.warmup.after_load:
            warmup.warm_model(loaded)
        self.changed()
        return Acquired(loaded, action, load_s, tuple(evicted))

    def _load(self, resolved: ResolvedModel, progress: ProgressFn | None) -> tuple[LoadedModel, LoadAction, list[str]]:
        pool, cache, _ = self._require()
        model_id = resolved.model_id
        estimate = self.estimate_bytes(resolved)
        self._fits_gpus(resolved, empty=True)  # several GPUs: refuse what never fits before evicting anything
        evicted = cache.make_room(estimate, for_key=model_id)
        if not self._fits_gpus(resolved, empty=False):
            # Room in the summed budget, not on each GPU for its blocks: evict every unpinned model (rare).
            evicted += cache.evict_unpinned(reason="lru")
        pool.reserve(model_id, estimate)
        try:
            self.faults.check("load", model_id)
            if self.parked is not None and model_id in self.parked:
                restored = self.parked.restore(model_id, self.device)
                if restored is not None:
                    return restored, "restored", evicted
            if progress is not None:
                progress(0, estimate)  # the caller sees the load start before the first bytes arrive
            self.faults.delay("load")
            loaded = self._call_loader(resolved, progress)
        except BaseException:
            pool.release(model_id)
            raise
        return loaded, "loaded", evicted

    def _call_loader(self, resolved: ResolvedModel, progress: ProgressFn | None) -> LoadedModel:
        return self.loader.load(
            resolved.model_id, resolved.path, device=self.device, dtype=self.dtype, progress=progress
        )

    def unload(self, model_id: str) -> int | None:
        """Drop a model (and any parked copy); returns the bytes freed, or None if it was not loaded."""
        _, cache, _ = self._require()
        entry_bytes = cache.size_of(model_id)
        loaded = cache.pop(model_id)
        if self.parked is not None and model_id in self.parked:
            self.parked.drop(model_id)
        self.changed()
        return None if loaded is None else int(entry_bytes or loaded.bytes)

    def begin_job(self, job_id: str, task: str, model: str | None) -> None:
        """Record the job now running; it is published if it still runs ``JOB_STATE_QUIET_S`` later."""
        self.current_job = {"id": job_id, "task": task, "model": model, "started_at": time.time()}
        self.job_state.request()

    def end_job(self, task: str, outcome: str) -> None:
        """Count the job under ``task|outcome`` ("ok" or the error's class name); none runs now.

        Published in the background once the worker goes quiet, together with the jobs before it and the cache's
        hit counts: at most every ``JOB_STATE_MAX_DELAY_S`` under a steady stream of jobs.
        """
        if outcome == "ok":
            self.jobs_done += 1
        key = f"{task}|{outcome}"
        self.jobs_by_outcome[key] = self.jobs_by_outcome.get(key, 0) + 1
        self.current_job = None
        self.job_state.request()

    def _count_load(self, load_s: float) -> None:
        # Cumulative like Prometheus' buckets: a load counts in every bucket whose bound it does not exceed.
        for bound in LOAD_S_BUCKETS:
            if load_s <= bound:
                self.load_s_buckets[str(bound)] += 1
        self.load_s_buckets["+Inf"] += 1
        self.load_s_sum += load_s

    def relieve_memory(self, *, keep: str | None = None) -> list[str]:
        """After an out-of-memory during a job: evict every unpinned model (but ``keep``) and return cached blocks."""
        _, cache, _ = self._require()
        evicted = cache.evict_unpinned(reason="oom", keep=keep)
        _empty_device_cache(self.device)
        self.changed()
        return evicted

    def _on_evict(self, model_id: str, loaded: LoadedModel, reason: str) -> None:
        parked = False
        if self.parked is not None and reason in ("lru", "expired", "oom"):
            try:
                parked = bool(self.parked.park(loaded))
            except Exception:  # parking is an optimisation; an eviction must still free the device
                log.exception("could not park %s; dropping it", model_id)
        if not parked:
            loaded.module = None  # drop the last reference even if a caller still holds the LoadedModel
        # No empty_cache() here: the caching allocator reuses the freed blocks for the next load; only the OOM
        # path (relieve_memory) hands memory back to the driver.
        gc.collect()
        log.info("evicted %s (%s%s)", model_id, reason, ", parked" if parked else "")

    # -- state and background work ------------------------------------------------------------------------

    def changed(self) -> None:
        """Tell the worker the state changed (it publishes a snapshot for the control commands), now.

        The snapshot carries the job bookkeeping too, so a deferred publish that was pending is dropped.
        """
        if self.on_change is None:
            return
        self.job_state.cancel()
        with self._publishing:
            self.on_change(self)

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Held by a job while it uses the device: idle expiry waits for it."""
        with self._serving:
            yield

    def expire_idle(self) -> list[str]:
        """Evict models idle for longer than ``idle_ttl_s``, unless a job is running; returns their ids.

        Called from the expiry thread: the serving lock is re-entrant, so a caller holding it would not be kept out.
        """
        if self.cache is None or not self._serving.acquire(blocking=False):
            return []
        try:
            expired = self.cache.expire()
        finally:
            self._serving.release()
        if expired:
            log.info("idle for over %g s, evicted: %s", self.idle_ttl_s, ", ".join(expired))
            self.changed()
        return expired

    def _start_expiry(self) -> None:
        if self.idle_ttl_s is None or self._expiry is not None:
            return
        # Check a few times per TTL so a model leaves within ~1.25 TTL of its last use, never sooner than one.
        interval_s = max(0.2, self.idle_ttl_s / 4)

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.expire_idle()
                except Exception:  # expiry is housekeeping: log and keep the worker serving
                    log.exception("idle expiry failed")

        self._expiry = threading.Thread(target=loop, name="gpufleet-idle-expiry", daemon=True)
        self._expiry.start()

    def stop(self) -> None:
        """Stop background work and mark the runtime not ready (the pool child is exiting).

        Pending job bookkeeping is not published here: the caller publishes the final state with :meth:`changed`.
        """
        self._stop.set()
        self.job_state.stop()
        self.ready = False


def _empty_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
