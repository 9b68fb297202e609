"""The corpus: text files and their provenance (sources), tokens and the vocabulary (vocab), the
encoded splits and their batches (batches)."""
