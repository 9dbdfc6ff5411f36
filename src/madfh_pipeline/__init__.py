"""MAD-FH: industrial visual anomaly detection with human feedback, as Kedro pipelines."""

import warnings

# kedro_datasets re-installs Kedro's "always show deprecations" filter when first imported; import it before ours.
import kedro_datasets  # noqa: F401

__version__ = "0.2.0"

# Known third-party noise, filtered at its source so that a run's first screen shows our messages, not ~75 lines of
# other projects' deprecation notices. Each filter names one message; our own warnings are never filtered.
# - Kedro 1.4+ deprecates `kedro run --pipeline` in favour of `--pipelines`; both are documented ways to run here.
warnings.filterwarnings("ignore", message=r"Option '--pipeline' is deprecated", category=DeprecationWarning)
# - omegaconf deprecates register_new_resolver(); Kedro's config loader and kedro-mlflow still call it.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)
# MLflow's advice to kedro-mlflow's model class cannot be filtered here (MLflow forces "once" around it): conf/logging.yml
# sends Python warnings of other packages to info.log instead of the screen.
