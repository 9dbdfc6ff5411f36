"""MAD-FH: industrial visual anomaly detection with human feedback, as Kedro pipelines."""

__version__ = "0.1.0"
