"""The three-stage recipe around the methods (optimizer groups, data and plots of the GLUE example). It imports the
methods; the methods never import it."""

from .training import param_groups


__all__ = ["param_groups"]
