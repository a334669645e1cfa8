"""The OT-MEL model: encoder, correlation assignment (ATT / OT), fusion, unimodal matching, scores."""

from otmel.model.features import EntityFeatures, MentionFeatures, Scores
from otmel.model.otmel import OTMEL

__all__ = ["OTMEL", "EntityFeatures", "MentionFeatures", "Scores"]
