"""Project settings (see https://docs.kedro.org/en/stable/configure/configuration_basics/)."""

from pathlib import Path

from kedro.config import OmegaConfigLoader
from kedro.utils import find_kedro_project

from madfh_pipeline.context import ProjectContext
from madfh_pipeline.hooks import RunTagsHook

# LIFO: kedro-mlflow's hook (registered after project hooks) starts the run first, then ours tags it.
HOOKS = (RunTagsHook(),)

# Hands the run's parameters (env + --params) to the pipeline registry; see madfh_pipeline.context.
CONTEXT_CLASS = ProjectContext


def project_root() -> str:
    """The project folder, so relative stores (``sqlite:///.../mlflow.db``) do not depend on the working directory."""
    return str(find_kedro_project(Path.cwd()) or Path.cwd())


CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # Envs override single keys (e.g. conf/demo sets a smaller target size) instead of whole top-level blocks.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    "custom_resolvers": {"project_root": project_root},
}
