"""The per-process serving state of a worker's pool child: warm-up, memory pool, model cache, loader.

Lives only in the pool child (CUDA never touches the forking parent). The child publishes a JSON snapshot of
this state to a file after every change; the parent answers the ``gpu_status``/``models_status``/
``cache_status`` control commands from it, so operators get answers even while a long job runs.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu.errors import DeviceOutOfMemoryError
from gpu.repository import ResolvedModel, default_hf_cache, list_models, resolve_model
from gpu.runtime.inference import LoadedModel
from gpu.runtime.loader import FastSafetensorsLoader, ModelLoader
from gpu.runtime.memory_pool import GPUMemoryPool, configure_allocator
from gpu.runtime.model_cache import ModelCache
from gpu.runtime.parking import ParkedStore
from gpu.runtime.warmup import GPUWarmupManager
from tasks.settings import Settings
from workers.faults import Faults
from workers.identity import WorkerIdentity

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Acquired:
    """A model ready to answer, and how it got there."""

    loaded: LoadedModel
    action: str  # "hit", "loaded", "restored"
    load_s: float
    evicted: tuple[str, ...] = ()


def state_dir(settings: Settings) -> Path:
    """Directory where pool children publish their state for the parent's control commands."""
    base = settings.worker.state_dir or Path(tempfile.gettempdir()) / f"gpufleet-{os.getuid()}"
    base.mkdir(parents=True, exist_ok=True)
    return base


def state_path(settings: Settings, worker_name: str) -> Path:
    return state_dir(settings) / f"{worker_name.replace('/', '_')}.json"


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

    The first import of a modeling module costs seconds (measured: 3.8 s for BERT's on this project's CPU VM,
    then 0.02 s for the next family), which would otherwise land on the first user's job. Returns the model
    types imported.
    """
    import importlib

    import transformers  # noqa: F401

    model_types = {"llama"}
    if settings.model_root is not None:
        for model_id in list_models(settings.model_root):
            try:
                config = json.loads((settings.model_root / model_id / "config.json").read_text())
            except (OSError, ValueError):
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
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.device = identity.device
        self.faults = faults or Faults.from_env()
        self.loader = loader or default_loader(settings)
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
        self.state_file = state_path(settings, identity.name)

    # -- start-up -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Warm the device up and preload priority models; afterwards the worker may consume jobs."""
        if self.device != "cpu":
            configure_allocator()  # before the first CUDA allocation
        self.dtype = choose_dtype(self.identity, self.settings)
        self.pool = GPUMemoryPool.from_config(self.device, self.settings.gpu)
        self.cache = ModelCache(self.pool.budget_bytes, on_evict=self._on_evict)
        self.warmup = GPUWarmupManager(self.device, self.settings.gpu.warmup, dtypes=(self.dtype,))
        self.parked = self._make_parked_store()
        if self.settings.gpu.warmup.enabled and self.settings.gpu.warmup.on_startup:
            self.warmup_report = self.warmup.warm_up().to_dict()
        self.preimported = preimport_model_code(self.settings)

        self.faults.delay("warmup")
        for model_id in self.settings.priority_models:
            self.acquire(model_id, pinned=True)
        self.ready = True
        self.ready_at = time.time()
        self.publish()

    def _make_parked_store(self) -> ParkedStore | None:
        host_budget_bytes = self.settings.gpu.memory_pool.host_budget_bytes
        return ParkedStore(host_budget_bytes) if host_budget_bytes > 0 else None

    # -- models -------------------------------------------------------------------------------------------

    def resolve(self, model_id: str) -> ResolvedModel:
        hf_cache = self.settings.hf_cache or default_hf_cache()
        return resolve_model(model_id, self.settings.model_root, hf_cache)

    def _require(self) -> tuple[GPUMemoryPool, ModelCache[LoadedModel], GPUWarmupManager]:
        if self.pool is None or self.cache is None or self.warmup is None:
            raise RuntimeError("WorkerRuntime.start() has not run")
        return self.pool, self.cache, self.warmup

    def estimate_bytes(self, resolved: ResolvedModel) -> int:
        """Bytes the model will take on the device, before loading (reconciled with the measure after)."""
        from gpu.plan.estimate import estimate_model_bytes
        from gpu.plan.specs import load_spec

        bytes_per_param = {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
        try:
            return int(estimate_model_bytes(load_spec(resolved.path), bytes_per_param))
        except Exception:  # an unplannable config still loads; size it from the files on disk
            files = list(resolved.path.glob("*.safetensors")) or list(resolved.path.glob("*.bin"))
            return sum(f.stat().st_size for f in files)

    def acquire(self, model_id: str, *, pinned: bool = False, progress: ProgressFn | None = None) -> Acquired:
        """The model, from the cache, the parked tier or disk, with room made for it.

        Raises:
            gpu errors: ModelNotFoundError, UnsafeModelIdError, CapacityError (incl. AllPinnedError),
            DeviceOutOfMemoryError after one eviction-and-retry, ModelLoadError.
        """
        pool, cache, warmup = self._require()
        cached = cache.get(model_id)
        if cached is not None:
            warmup.record_use(model_id, hit=True)
            if pinned:
                cache.pin(model_id)
            return Acquired(cached, "hit", 0.0)
        resolved = self.resolve(model_id)
        started = time.perf_counter()
        try:
            loaded, action, evicted = self._load(resolved, progress)
        except DeviceOutOfMemoryError:
            # Fragmentation or stale blocks: free everything unpinned, return the cached blocks, try once more.
            log.warning("out of memory loading %s; evicting unpinned models and retrying once", model_id)
            cache.evict_unpinned(reason="oom")
            _empty_device_cache(self.device)
            loaded, action, evicted = self._load(resolved, progress)
        load_s = time.perf_counter() - started
        evicted += cache.put(model_id, loaded, loaded.bytes, pinned=pinned, load_s=load_s)
        pool.reconcile(model_id, loaded.bytes)
        if self.settings.gpu.warmup.after_load:
            warmup.warm_model(loaded)
        warmup.record_load(model_id, load_s)
        warmup.record_use(model_id, hit=False)
        self.publish()
        return Acquired(loaded, action, load_s, tuple(evicted))

    def _load(self, resolved: ResolvedModel, progress: ProgressFn | None) -> tuple[LoadedModel, str, list[str]]:
        pool, cache, _ = self._require()
        model_id = resolved.model_id
        estimate = self.estimate_bytes(resolved)
        evicted = cache.make_room(estimate, for_key=model_id)
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
        entry_bytes = next((e["size_bytes"] for e in cache.entries() if e["key"] == model_id), None)
        loaded = cache.pop(model_id)
        if self.parked is not None and model_id in self.parked:
            self.parked.drop(model_id)
        self.publish()
        return None if loaded is None else int(entry_bytes or loaded.bytes)

    def job_done(self) -> None:
        """Count a finished job and publish the state (cache hits change it too)."""
        self.jobs_done += 1
        self.publish()

    def relieve_memory(self) -> list[str]:
        """After an out-of-memory during a job: evict every unpinned model and return cached blocks."""
        _, cache, _ = self._require()
        evicted = cache.evict_unpinned(reason="oom")
        _empty_device_cache(self.device)
        self.publish()
        return evicted

    def _on_evict(self, model_id: str, loaded: LoadedModel, reason: str) -> None:
        if self.pool is not None:
            self.pool.release(model_id)
        parked = False
        if self.parked is not None and reason in ("lru", "expired", "capacity", "oom"):
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

    # -- state --------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The state operators see: device, warm-up, memory pool, models and cache, as JSON."""
        base = {
            "worker": self.identity.name,
            "pid": os.getpid(),
            "gpu_type": self.identity.gpu_type,
            "device": self.identity.device_label,
            "ready": self.ready,
            "ready_at": self.ready_at,
            "dtype": self.dtype,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "jobs_done": self.jobs_done,
            "loader": getattr(self.loader, "name", type(self.loader).__name__),
            "preimported_model_code": self.preimported,
        }
        if self.pool is None or self.cache is None or self.warmup is None:
            return {**base, "gpu": {}, "models": {}, "cache": {}}
        return {
            **base,
            "gpu": {
                "warm": self.warmup.is_warm,
                "warmup": self.warmup_report,
                "memory_pool": self.pool.stats(),
                "memory": self.warmup.memory_report(),
            },
            "models": {"loaded": self.cache.entries(), "usage": self.warmup.usage()},
            "cache": {
                "stats": self.cache.stats().to_dict(),
                "parked": None
                if self.parked is None
                else {
                    "stats": self.parked.stats(),
                    "entries": self.parked.entries(),
                },
            },
        }

    def publish(self) -> None:
        """Write the snapshot atomically for the parent's control commands."""
        tmp = self.state_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot(), default=str))
        tmp.replace(self.state_file)


def _empty_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
