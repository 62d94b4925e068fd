"""Every setting is documented in the README's configuration table, under its exact variable name."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from gpufleet.tasks.settings import ENV_DELIMITER, ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[3] / "README.md"


def variables(model: type[BaseModel], prefix: str = ENV_PREFIX) -> list[str]:
    names = []
    for field_name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += variables(annotation, f"{prefix}{field_name.upper()}{ENV_DELIMITER}")
        else:
            names.append(prefix + field_name.upper())
    return names


def test_every_variable_is_in_the_readme() -> None:
    text = README.read_text()
    names = variables(Settings)
    assert len(names) > 25
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"document these in README.md's configuration table: {missing}"
