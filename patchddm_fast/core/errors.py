"""The single exception type of the data layer.

Every problem with a user's files (missing modality, corrupt gzip, mismatched grids,
unexpected label values, ...) is raised as :class:`DatasetError`, whose message always
names the file or folder and the problem, so that a CLI can print it as-is and exit.
It subclasses :class:`ValueError` so generic callers that catch bad-input errors keep working.
"""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset, case or file cannot be used; the message names the path and the problem."""
