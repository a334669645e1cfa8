"""Will it fit, and how long will it take? `otmel plan` for a config on a user's GPUs.

The configured towers are built at full size with random weights (no download: `OTMEL(cfg, random_init=True)`), a
few real training steps are measured on this machine (`_step`: peak memory by kind through `_memory.StorageWatch`,
FLOPs through torch's FLOP counter), fitted to per-sample / per-pair costs (`_fit`), and projected onto the
config's per-GPU batch, pool and ZeRO stage (`_states`, DeepSpeed's own accounting) and the user's GPUs
(`_project`); the KG index's size follows from the feature shapes (`_index_size`). `_report.render` prints it.
"""

from otmel.plan._fit import PROBES, StepModel, fit
from otmel.plan._index_size import EntityShapes, IndexSize, entity_shapes, index_size
from otmel.plan._memory import StorageWatch, Timeline
from otmel.plan._project import PAPER_DATASETS, DatasetSize, Hardware, Measurements, Plan, make_plan, measure, project
from otmel.plan._report import render
from otmel.plan._states import ModelStates, largest_layer_params, model_states
from otmel.plan._step import Probe, build_probe_model, eval_cost, synthetic_batch, tower_flops, train_probe

__all__ = ["PROBES", "PAPER_DATASETS", "DatasetSize", "EntityShapes", "Hardware", "IndexSize", "Measurements",
           "ModelStates", "Plan", "Probe", "StepModel", "StorageWatch", "Timeline", "build_probe_model",
           "entity_shapes", "eval_cost", "fit", "index_size", "largest_layer_params", "make_plan", "measure",
           "model_states", "project", "render", "synthetic_batch", "tower_flops", "train_probe"]
