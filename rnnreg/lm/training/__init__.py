"""Training: the start of a run (start), the loop (loop), its checkpoints, Progress and random
states and the config a resume continues with, and signals (resume), what it prints (console),
the optimizer schedule (asgd) and the loss (loss)."""
