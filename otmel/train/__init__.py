"""Training on Ray: `worker/` runs inside each Ray Train worker, `driver/` starts and drives runs (train, tune,
ablate, study). Analyses of finished runs live in `otmel.analysis`; the run config in `otmel.runconfig`."""
