"""Training: the Accelerate loop and its plumbing (EMA, optimizer groups, data order, checkpoints, trackers)."""
