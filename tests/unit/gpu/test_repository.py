from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.gpu.errors import ModelNotInstalledError, UnsafeModelIdError
from gpufleet.gpu.repository import list_models, resolve_model, validate_model_id


def _model(root: Path, model_id: str) -> Path:
    path = root / model_id
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolves_inside_root(tmp_path: Path) -> None:
    path = _model(tmp_path, "org/name")
    resolved = resolve_model("org/name", tmp_path)
    assert resolved.path == path and resolved.source == "root"
    assert list_models(tmp_path) == ["org/name"]


@pytest.mark.parametrize("model_id", ["", "../etc", "org/../../x", "/abs/path", "a/b/c", "org\\name", "..", "a/.x"])
def test_refuses_ids_that_could_escape(tmp_path: Path, model_id: str) -> None:
    with pytest.raises(UnsafeModelIdError):
        validate_model_id(model_id)
    with pytest.raises(UnsafeModelIdError):
        resolve_model(model_id, tmp_path)


def test_refuses_symlink_out_of_root(tmp_path: Path) -> None:
    outside = _model(tmp_path / "outside", "secret")
    root = tmp_path / "root"
    (root / "org").mkdir(parents=True)
    (root / "org" / "link").symlink_to(outside)
    with pytest.raises(UnsafeModelIdError, match="outside the model root"):
        resolve_model("org/link", root)


def test_missing_model_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ModelNotInstalledError, match="make-demo"):
        resolve_model("org/absent", tmp_path)


def test_offline_hf_cache_snapshot(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text("abc123")
    resolved = resolve_model("org/cached", tmp_path / "empty-root", cache)
    assert resolved.path == snapshot and resolved.source == "hf-cache"


def test_a_directory_with_only_a_gguf_file_is_a_model(tmp_path: Path) -> None:
    path = tmp_path / "org" / "gguf"
    path.mkdir(parents=True)
    (path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "org" / "empty").mkdir()
    (tmp_path / "org" / ".partial" / "half").mkdir(parents=True)
    (tmp_path / "org" / ".partial" / "half" / "x.gguf").write_bytes(b"GGUF")
    assert resolve_model("org/gguf", tmp_path).path == path
    with pytest.raises(ModelNotInstalledError):
        resolve_model("org/empty", tmp_path)
    assert list_models(tmp_path) == ["org/gguf"]
