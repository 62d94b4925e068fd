"""Model families beyond the demo pair, served by a real `gpufleet worker --cpu`: a GGUF file, an XLM-RoBERTa
embedding model and a multimodal checkpoint's text generation; a quantized checkpoint is refused clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gpufleet.gpu.plan.estimate import estimate_weights_bytes
from gpufleet.gpu.plan.specs import load_spec
from gpufleet.tasks.client import FleetClient
from gpufleet.tasks.errors import ModelLoadError
from gpufleet.tasks.settings import load_settings
from gpufleet.workers.tools.checkpoints import make_checkpoint
from gpufleet.workers.tools.gguf_export import make_gguf_model
from tests.integration.conftest import RunningWorker, WorkerFactory

pytestmark = pytest.mark.integration

GGUF = "gguf/tiny-llama-q8"
XLMR = "xlmr/tiny-xlm-roberta"
VL = "vl/tiny-qwen2-vl"
QUANTIZED = "quant/tiny-gptq"
RESULT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def families_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("family-models")
    make_gguf_model(root / GGUF)
    make_checkpoint(root / XLMR, "xlm-roberta")
    make_checkpoint(root / VL, "qwen2_vl")
    quantized = make_checkpoint(root / QUANTIZED, "llama")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (quantized / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def families(module_worker_factory: WorkerFactory, families_root: Path) -> tuple[RunningWorker, FleetClient]:
    """A worker serving the families' root, and a producer that plans from the same root."""
    worker = module_worker_factory({"GPUFLEET_MODEL_ROOT": str(families_root)})
    settings = load_settings(
        broker_url=worker.env["GPUFLEET_BROKER_URL"],
        result_backend=worker.env["GPUFLEET_RESULT_BACKEND"],
        model_root=families_root,
        fleet={"gpu_types": ("cpu",)},
    )
    return worker, FleetClient(settings=settings)


def test_gguf_model_is_served_and_planned_dequantized(
    families: tuple[RunningWorker, FleetClient], families_root: Path
) -> None:
    worker, client = families
    loaded = client.load_model(GGUF).get(timeout=RESULT_TIMEOUT_S)
    assert "gguf" in loaded["loader"].lower()
    # The worker holds the dequantized fp32 weights: what the plan reserved, several times the Q8_0 file.
    planned = estimate_weights_bytes(load_spec(families_root / GGUF), dtype_bytes=4)
    file_bytes = next((families_root / GGUF).glob("*.gguf")).stat().st_size
    assert planned <= loaded["bytes"] <= planned * 1.01 and loaded["bytes"] > 2 * file_bytes
    result = client.generate(GGUF, prompt="The fleet serves", max_new_tokens=6).get(timeout=RESULT_TIMEOUT_S)
    assert result["worker"] == worker.name and 1 <= result["completion_tokens"] <= 6
    chat = client.generate(GGUF, messages=[{"role": "user", "content": "Hi!"}], max_new_tokens=4).get(
        timeout=RESULT_TIMEOUT_S
    )
    assert chat["prompt_tokens"] > 3, "the chat template from the GGUF metadata wraps the message"


def test_xlm_roberta_embeddings(families: tuple[RunningWorker, FleetClient]) -> None:
    _, client = families
    texts = ["The train left the station.", "Une phrase en français.", "The train left the station."]
    result = client.embed(XLMR, texts).get(timeout=RESULT_TIMEOUT_S)
    vectors = result["embeddings"]
    assert result["dim"] == 128 and len(vectors) == 3
    assert all(abs(math.hypot(*v) - 1.0) < 1e-4 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5) and vectors[0] != pytest.approx(vectors[1], abs=1e-3)


def test_multimodal_checkpoint_generates_text(families: tuple[RunningWorker, FleetClient]) -> None:
    _, client = families
    first = client.generate(VL, prompt="The weather", max_new_tokens=5).get(timeout=RESULT_TIMEOUT_S)
    again = client.generate(VL, prompt="The weather", max_new_tokens=5).get(timeout=RESULT_TIMEOUT_S)
    assert first["text"] == again["text"] and 1 <= first["completion_tokens"] <= 5


def test_quantized_checkpoint_is_refused_on_cpu(families: tuple[RunningWorker, FleetClient]) -> None:
    worker, _ = families
    # Sent straight to the worker's queue: the producer's plan would not route a GPTQ model to CPU at all.
    result = worker.send("fleet.load_model", queue=worker.direct_queue, kwargs={"model": QUANTIZED})
    with pytest.raises(ModelLoadError, match=r"gptq-quantized.*need CUDA kernels.*route it to a GPU"):
        result.get(timeout=RESULT_TIMEOUT_S)
    still_up = worker.client.embed(XLMR, ["still serving"], queue=worker.direct_queue)
    assert still_up.get(timeout=RESULT_TIMEOUT_S)["dim"] == 128
