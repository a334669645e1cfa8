"""Drivers: code that starts and drives runs on Ray (train, tune, ablate, study) and shows them on the console."""
