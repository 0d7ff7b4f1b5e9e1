"""Prompt sets: the ones shipped as data (`short`, `reasoning`) or a JSON file of the same
shape: `{"prompts": [...], "suffix": "..."}` or a plain list of strings."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field

BUILTIN_SETS = ("short", "reasoning")


class PromptSet(BaseModel):
    description: str = ""
    # Appended to every prompt: the reasoning set's "show every step" instruction.
    suffix: str = ""
    prompts: list[str] = Field(min_length=1)

    def messages(self, index: int) -> list[dict[str, str]]:
        text = self.prompts[index]
        content = f"{text}\n\n{self.suffix}" if self.suffix else text
        return [{"role": "user", "content": content}]


def load_prompt_set(name_or_path: str) -> PromptSet:
    if name_or_path in BUILTIN_SETS:
        data = resources.files("loadtest").joinpath("data", f"{name_or_path}.json").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(
                f"expected a prompt set ({', '.join(BUILTIN_SETS)}) or a JSON file, "
                f"got {name_or_path!r}"
            )
        data = path.read_text()
    raw = json.loads(data)
    return PromptSet.model_validate({"prompts": raw} if isinstance(raw, list) else raw)
