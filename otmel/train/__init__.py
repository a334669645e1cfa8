"""Training: the loop(s) and the distributed helpers; the Ray-aware code of otmel lives here only."""
