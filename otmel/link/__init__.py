"""Inference on a trained checkpoint: the entity index, linking new mentions, evaluation of the linking
modes, explanations (assignment figures) and run reports. See docs/linking.md."""

from otmel.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint_model, save_model_checkpoint
from otmel.link.index import EntityIndex, EntityIndexError, IndexMismatchError
from otmel.link.index_build import build_index
from otmel.link.linker import LinkedEntity, Linker, LinkInputError, MentionNotInTextWarning

__all__ = [
    "CheckpointError", "EntityIndex", "EntityIndexError", "IndexMismatchError", "LinkInputError", "LinkedEntity",
    "Linker", "LoadedCheckpoint", "MentionNotInTextWarning", "build_index", "load_checkpoint_model",
    "save_model_checkpoint",
]
