"""mailingest: e-mailed identity documents into Alloy, unattended."""

__version__ = "0.1.0"
