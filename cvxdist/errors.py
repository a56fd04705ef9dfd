"""Errors the library raises for bad input; the command line prints them as one line.

This module sits at the bottom of the package: every layer may import it, and it imports
nothing of cvxdist. ``cvxdist.cli`` catches :class:`UserError` and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing written."""
