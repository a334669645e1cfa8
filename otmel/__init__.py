"""otmel: optimal-transport guided correlation assignment for multimodal entity linking.

`import otmel` is light (no torch, no Ray). The library is in its subpackages: `otmel.link.Linker` links
mentions, `otmel.cli` is the `otmel` command (docs/design.md, "Layout").
"""

from otmel.version import __version__

__all__ = ["__version__"]
