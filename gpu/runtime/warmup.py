"""Warming a device and freshly loaded models up before they serve jobs (torch imported lazily).

The first CUDA operation of a process creates the context (hundreds of ms); the first matmul of each dtype
loads cuBLAS/cuBLASLt and picks kernels; the first convolution loads cuDNN; the first large allocation makes the
caching allocator map memory. Paid on a user's job, that is the "first request is slow" penalty. A worker runs
:meth:`GPUWarmupManager.warm_up` once at start, before it consumes jobs, and :meth:`GPUWarmupManager.warm_model`
after each load, so the first real job of a model runs at steady speed.

On the CPU the same operations run with small shapes: nothing needs warming there, but the code path is the
same, so CI exercises it.

The manager only warms up: what is resident and how it is used is the model cache's record
(:mod:`gpufleet.gpu.runtime.model_cache`), and device memory is reported by the memory pool
(:mod:`gpufleet.gpu.runtime.memory_pool`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.config import WarmupConfig, WarmupOp, WarmupSize
from gpufleet.gpu.errors import ConfigError
from gpufleet.gpu.runtime.model import LoadedModel, ModelKind
from gpufleet.gpu.units import SERVED_DTYPES, MiB

if TYPE_CHECKING:
    import torch

__all__ = ["GPUWarmupManager", "WarmupReport", "WarmupStep"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Shapes:
    matmul_n: int  # square matmul side
    conv: tuple[int, int, int]  # batch, channels, height = width
    memory_bytes: int  # one allocator block


# GPU shapes: "large" matches the GEMMs of a 4k-hidden model; "small" keeps start-up under a second on a T4.
_GPU_SHAPES = {
    WarmupSize.SMALL: _Shapes(matmul_n=512, conv=(4, 32, 32), memory_bytes=64 * MiB),
    WarmupSize.MEDIUM: _Shapes(matmul_n=2048, conv=(8, 64, 64), memory_bytes=256 * MiB),
    WarmupSize.LARGE: _Shapes(matmul_n=4096, conv=(16, 128, 128), memory_bytes=1024 * MiB),
}
# The CPU has no kernels to load: small shapes prove the path without slowing tests.
_CPU_SHAPES = _Shapes(matmul_n=128, conv=(2, 8, 16), memory_bytes=8 * MiB)

_WARM_SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Warming up the model before serving."]
_WARM_PROMPT = "Hello, how are you today?"


@dataclass(frozen=True)
class WarmupStep:
    """One warm-up operation and how long it took (device synchronised, so the time is real)."""

    op: str  # "context", "matmul", "linear", "attention", "conv2d", "memory"
    detail: str  # dtype and shape, e.g. "float16 2048x2048"
    seconds: float
    skipped: str | None = None  # why it did not run (e.g. bf16 unsupported on this GPU)


@dataclass(frozen=True)
class WarmupReport:
    """What :meth:`GPUWarmupManager.warm_up` did."""

    device: str
    size: str
    steps: tuple[WarmupStep, ...] = ()
    total_s: float = 0.0
    skipped: str | None = None  # why nothing ran (warm-up disabled)

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (steps as a list of dicts)."""
        data = asdict(self)
        data["steps"] = list(data["steps"])
        return data


class GPUWarmupManager:
    """Warms one device up, and models up after loading.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        config: the warm-up settings.
        dtypes: the dtypes models are served in ("float32", "float16", "bfloat16"); each gets its matmuls.

    Raises:
        ConfigError: an unknown device or dtype.
    """

    def __init__(self, device: str, config: WarmupConfig, *, dtypes: Sequence[str] = ("float16",)) -> None:
        if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
            raise ConfigError(f"device {device!r} is not served; use 'cpu', 'cuda' or 'cuda:N'")
        unknown = [d for d in dtypes if d not in SERVED_DTYPES]
        if unknown or not dtypes:
            raise ConfigError(f"warm-up dtypes must be some of {', '.join(SERVED_DTYPES)}, got {list(dtypes)}")
        self.device = device
        self.config = config
        self.dtypes = tuple(dict.fromkeys(dtypes))  # de-duplicated, order kept
        self._warm = False

    @property
    def is_cuda(self) -> bool:
        """Whether the device is a CUDA device."""
        return self.device.startswith("cuda")

    @property
    def is_warm(self) -> bool:
        """Whether :meth:`warm_up` has run to the end on this device."""
        return self._warm

    # ------------------------------------------------------------------------------------------- device

    def warm_up(self) -> WarmupReport:
        """Create the CUDA context and run the configured operations for every served dtype.

        Returns:
            The report; ``skipped`` says why when warm-up is disabled.

        Raises:
            ConfigError: the device is CUDA but CUDA is not available in this process.
            DeviceOutOfMemoryError: the device cannot hold the warm-up shapes (choose a smaller size).
        """
        size = self.config.size.value
        if not self.config.enabled:
            return WarmupReport(self.device, size, skipped="warm-up disabled (GPUFLEET_GPU__WARMUP__ENABLED=false)")
        import torch

        from gpufleet.gpu.runtime.oom import translate_oom

        if self.is_cuda and not torch.cuda.is_available():
            raise ConfigError(
                f"warm-up asked for {self.device} but CUDA is not available to this process (torch "
                f"{torch.__version__}); check the driver and CUDA_VISIBLE_DEVICES, or run the worker with --cpu"
            )
        device = torch.device(self.device)
        shapes = _GPU_SHAPES[self.config.size] if self.is_cuda else _CPU_SHAPES
        steps: list[WarmupStep] = []
        started = time.perf_counter()
        with translate_oom(f"warming up {self.device} with {size} shapes"), torch.inference_mode():
            steps.append(self._timed("context", "first tensor on the device", device, lambda: _context(device)))
            if WarmupOp.MATMUL in self.config.operations:
                for dtype_name in self.dtypes:
                    steps.extend(self._matmul_steps(device, dtype_name, shapes.matmul_n))
            if WarmupOp.CONV2D in self.config.operations:
                dtype_name = self._conv_dtype()
                batch, channels, side = shapes.conv
                steps.append(
                    self._timed(
                        "conv2d",
                        f"{dtype_name} {batch}x{channels}x{side}x{side} 3x3",
                        device,
                        lambda: _conv2d(device, _dtype(dtype_name), batch, channels, side),
                    )
                )
            if WarmupOp.MEMORY in self.config.operations:
                steps.append(
                    self._timed(
                        "memory",
                        f"allocate and free {shapes.memory_bytes // MiB} MiB",
                        device,
                        lambda: _memory(device, shapes.memory_bytes),
                    )
                )
        if self.is_cuda:
            # The scratch tensors are gone; hand their cached blocks back so the memory budget and the
            # allocator's reserved/allocated ratio start from the models alone. Kernels and context stay loaded.
            torch.cuda.empty_cache()
        self._warm = True
        report = WarmupReport(self.device, size, tuple(steps), time.perf_counter() - started)
        logger.info("warm-up of %s took %.3f s over %d steps", self.device, report.total_s, len(steps))
        return report

    def _matmul_steps(self, device: torch.device, dtype_name: str, n: int) -> list[WarmupStep]:
        import torch

        if self.is_cuda and dtype_name == "bfloat16" and not torch.cuda.is_bf16_supported():
            reason = "bfloat16 is not supported on this GPU (needs compute capability 8.0+)"
            return [WarmupStep(op, f"bfloat16 {n}x{n}", 0.0, skipped=reason) for op in ("matmul", "linear")]
        dtype = _dtype(dtype_name)
        return [
            # torch.mm goes to cuBLAS; linear with a bias takes the cuBLASLt epilogue path; attention loads the
            # fused SDPA kernels transformers models call. Each is a separate first-call cost.
            self._timed("matmul", f"{dtype_name} {n}x{n}", device, lambda: _matmul(device, dtype, n)),
            self._timed("linear", f"{dtype_name} {n}x{n} + bias", device, lambda: _linear(device, dtype, n)),
            self._timed("attention", f"{dtype_name} sdpa 1x8x128x64", device, lambda: _attention(device, dtype)),
        ]

    def _conv_dtype(self) -> str:
        # cuDNN picks kernels per dtype too, but one convolution is enough to load the library; use the first
        # half-precision dtype served on a GPU (fp16 convs on the CPU are slow and unrepresentative).
        if not self.is_cuda:
            return "float32"
        return next((d for d in self.dtypes if d == "float16"), self.dtypes[0])

    def _timed(self, op: str, detail: str, device: torch.device, run: Callable[[], object]) -> WarmupStep:
        _synchronize(device)
        started = time.perf_counter()
        run()
        _synchronize(device)
        return WarmupStep(op, detail, time.perf_counter() - started)

    # ------------------------------------------------------------------------------------------- models

    def warm_model(self, loaded: LoadedModel) -> float:
        """Run one representative request through a freshly loaded model, through the same code jobs use.

        An embedding model embeds two short sentences; a causal LM generates two tokens from a short prompt
        (a prefill forward, then decoding steps with the KV cache), so the first real job runs at steady speed.
        The seconds it took are also left in ``loaded.extra["warm_s"]`` for status reports.

        Args:
            loaded: the model, already on its device.

        Returns:
            Seconds the warm-up request took (device synchronised).

        Raises:
            ForwardError: the model failed on the warm-up request (a real job would fail the same way).
            DeviceOutOfMemoryError: the device ran out of memory during it.
        """
        import torch

        from gpufleet.gpu.runtime.inference import embed, generate
        from gpufleet.gpu.runtime.oom import translate_model_errors
        from gpufleet.gpu.runtime.options import GenerateOptions

        device = torch.device(loaded.device)
        # embed and generate translate their own failures; this also covers the synchronisations, where an
        # asynchronous CUDA error of the warm-up kernels surfaces.
        with translate_model_errors(
            loaded.model_id,
            f"answering its warm-up request ({loaded.kind.value})",
            "the model loaded but cannot answer; check its config.json and tokenizer files",
        ):
            _synchronize(device)
            started = time.perf_counter()
            if loaded.kind is ModelKind.EMBEDDING:
                embed(loaded, list(_WARM_SENTENCES))
            else:
                generate(loaded, GenerateOptions(prompt=_WARM_PROMPT, max_new_tokens=2))
            _synchronize(device)
        warm_s = time.perf_counter() - started
        loaded.extra["warm_s"] = warm_s
        return warm_s


# ---------------------------------------------------------------------------------------- the operations


def _dtype(name: str) -> torch.dtype:
    from gpufleet.gpu.runtime.checkpoint_io import torch_dtype

    return torch_dtype(name)


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _context(device: torch.device) -> None:
    import torch

    torch.zeros(1, device=device).add_(1)


def _matmul(device: torch.device, dtype: torch.dtype, n: int) -> None:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # the second call runs with the kernel already chosen
        torch.mm(a, b)


def _linear(device: torch.device, dtype: torch.dtype, n: int) -> None:
    import torch

    x = torch.randn(16, n, device=device, dtype=dtype)
    weight = torch.randn(n, n, device=device, dtype=dtype)
    bias = torch.randn(n, device=device, dtype=dtype)
    for _ in range(2):
        torch.nn.functional.linear(x, weight, bias)


def _attention(device: torch.device, dtype: torch.dtype) -> None:
    import torch

    q, k, v = (torch.randn(1, 8, 128, 64, device=device, dtype=dtype) for _ in range(3))
    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _conv2d(device: torch.device, dtype: torch.dtype, batch: int, channels: int, side: int) -> None:
    import torch

    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
    weight = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    torch.nn.functional.conv2d(x, weight, padding=1)


def _memory(device: torch.device, n_bytes: int) -> None:
    import torch

    block = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    block.fill_(1)  # touch it, so the pages are really mapped
    del block
