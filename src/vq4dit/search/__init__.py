"""Q-DiT's group-size search: the scaled search space and budget, the evolutionary loop, candidate scoring."""
