# Copyright (c) 2026 The CPCL bundle authors
# SPDX-License-Identifier: Apache-2.0
"""The package's input errors, in a leaf module that imports nothing of the package: every module that reports bad
input (data, DICOM, pre-flight checks) raises these, and importing this module installs the ``sys.excepthook``
(:func:`report_input_errors`) that turns an uncaught one into the last lines a person sees."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["InputError", "MissingInputError", "input_error_in", "report_input_errors"]


class InputError(ValueError):
    """Bad input: one line per problem, each naming the case (or file) and the cause.

    An uncaught ``InputError`` (also as the cause of another exception, e.g. MONAI's "Failed to evaluate
    ConfigExpression") ends a command-line run with the problem list as the last lines printed and exit status
    1, without a traceback (:func:`report_input_errors`; ``CPCL_TRACEBACK=1`` shows it).
    """

    def __init__(self, problems: Sequence[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        super().__init__(f"{n} input problem{'s' if n > 1 else ''}:\n" + "\n".join(f"  {p}" for p in self.problems))


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that does not exist (an :class:`InputError` and a ``FileNotFoundError``)."""


def input_error_in(exc: BaseException | None) -> InputError | None:
    """The :class:`InputError` in ``exc``'s chain of causes and contexts, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report_input_errors(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    """``sys.excepthook``: bad input ends the run with ``error: N input problems:`` and one line per problem as
    the last lines on screen (the process exits with status 1, as for any uncaught exception); everything else
    goes to the previous hook (Python's traceback)."""
    found = input_error_in(exc)
    if found is None or os.environ.get("CPCL_TRACEBACK", "").strip() not in ("", "0"):
        _previous_hook(exc_type, exc, tb)
        return
    _close_progress_bars()
    sys.stdout.flush()
    print(f"error: {found}", file=sys.stderr, flush=True)


def _close_progress_bars() -> None:
    """Close the progress bars still open (Ignite's ``ProgressBar`` of a training stopped by the error): closed at
    exit instead, they would print themselves after the error lines."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", None) or ()):
        try:
            bar.close()
        except Exception:  # a bar that cannot close must not hide the error
            pass


_previous_hook = sys.excepthook
if getattr(sys.excepthook, "__name__", "") != report_input_errors.__name__:
    sys.excepthook = report_input_errors
