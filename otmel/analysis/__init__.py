"""Analyses of models and finished runs: plan statistics, seed studies (no Ray here)."""
