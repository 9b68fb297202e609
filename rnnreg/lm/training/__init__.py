"""Training: the start of a run (start), the loop (loop), resume and signals (resume), what it
prints (console), the optimizer schedule (asgd) and the loss (loss)."""
