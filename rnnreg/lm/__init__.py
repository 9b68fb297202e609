"""rnnreg.lm: the language-modeling toolkit built on :mod:`rnnreg.nn`.

Data flows one way: corpus files (:mod:`~rnnreg.lm.corpus.sources`) -> tokens and vocabulary
(:mod:`~rnnreg.lm.corpus.vocab`) -> encoded corpus and batches (:mod:`~rnnreg.lm.corpus.batches`)
-> model (:mod:`~rnnreg.lm.model`) -> loss -> metrics, driven by one trainer
(:mod:`~rnnreg.lm.training.loop`) that writes a run directory (:mod:`~rnnreg.lm.rundir.layout`)
every other command can re-read (:mod:`~rnnreg.lm.evaluation`, :mod:`~rnnreg.lm.generation`).
"""
