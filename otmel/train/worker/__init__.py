"""Code that runs inside a Ray Train worker: the per-worker loop, the engine (DeepSpeed / DDP), the global
negative pool, whole-KG evaluation, hard-negative mining, checkpoints, W&B tracking, progress to the driver."""
