"""rnnreg.study: the dropout-strategy comparison as a grid of ordinary runs.

:mod:`~rnnreg.study.grid` builds and schedules the grid, :mod:`~rnnreg.study.results` reads
and groups its runs, :mod:`~rnnreg.study.report` writes its Markdown/HTML report and
:mod:`~rnnreg.study.plots` its figures; :class:`~rnnreg.study.layout.StudyDir` is where each of
them lives in the study directory.
"""
