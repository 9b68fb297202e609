"""Training: the start of a run (start), the loop (loop), what a checkpoint holds: the
training state, Progress and random states (state), when checkpoints are written, the config a
resume continues with, and signals (resume), what it prints (console), the optimizer schedule
(asgd) and the loss (loss)."""
