"""Evaluation of synthesised quantitative maps: regional statistics, agreement, voxelwise errors, figures.

Entry point: :func:`training.evaluation.report.evaluate_subjects`, fed with
:class:`training.evaluation.subjects.SubjectMaps` (one per subject; phantom truth via
:func:`training.evaluation.subjects.load_phantom_subject`). :mod:`training.evaluation.baseline` is the
intensity-lookup baseline a model must beat, :mod:`training.evaluation.protocols` the per-acquisition-group
table; :mod:`training.evaluate_model` runs a model package over datasets with all of them.
"""
