"""The training layer: the experiment config and builder, the run directory and its lock, checkpoints,
tracking and progress, optimizer and schedules, learning dynamics, compile and budget, and the loop of the
reference recipe. It may import every other layer; only the command line (`picomaml.cli`) imports it."""
