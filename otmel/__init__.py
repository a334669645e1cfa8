"""otmel: optimal-transport guided correlation assignment for multimodal entity linking."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from otmel.link.linker import Linker


def __getattr__(name: str) -> Any:
    """Lazy exports: `otmel.Linker` imports torch (and the model) only when first used."""
    if name == "Linker":
        from otmel.link.linker import Linker

        return Linker
    raise AttributeError(f"module 'otmel' has no attribute {name!r}")


__all__ = ["Linker", "__version__"]
