"""What a second `make run` costs when nothing changed, against the first (target: < 25 % of its pipeline time).

Runs exactly what `make run` runs — `kedro run --env demo --pipelines=<category>` through the real CLI — in a
throw-away copy of the project (its conf/, pyproject.toml and a fresh MLflow database), on the demo data generated
there: a first run (everything computed), then a second with nothing changed. Kedro's own "Pipeline execution
completed successfully in X sec" is the measure (the CLI's start-up is reported beside it), and the second run's log
must show that no model was fitted and no map computed.

    .venv/bin/python bench/rerun.py                     # wallplugs, the demo as shipped (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, git_revision  # bench/common.py (the script directory is on sys.path)

logger = logging.getLogger("bench.rerun")
PIPELINE_TIME = re.compile(r"Pipeline execution completed successfully in ([0-9.]+) sec")


def _kedro(project: Path, args: list[str], log: Path) -> tuple[float, float, str]:
    env = os.environ | {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "COLUMNS": "200"}
    started = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).with_name("kedro")), "run", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    log.write_text(output)
    if result.returncode != 0:
        raise RuntimeError(f"kedro run {' '.join(args)} failed (exit {result.returncode}); log: {log}")
    match = PIPELINE_TIME.search(output)
    if match is None:
        raise RuntimeError(f"No pipeline time in the log of kedro run {' '.join(args)}: {log}")
    return float(match.group(1)), wall, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="wallplugs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project (its path is logged)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "rerun.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="madfh_rerun_"))
    project = work / "project"
    project.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", project / "pyproject.toml")
    shutil.copy2(ROOT / ".telemetry", project / ".telemetry")
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    (project / "src").mkdir()
    logger.info("Temporary project: %s", project)
    logs = work / "logs"
    logs.mkdir()
    try:
        demo_s, demo_wall, _ = _kedro(
            project, ["--env", "demo", "--pipelines", "demo_data", "--namespaces", args.category], logs / "demo.log"
        )
        runs: list[dict[str, Any]] = []
        for index in (1, 2):
            pipeline_s, wall, output = _kedro(
                project, ["--env", "demo", f"--pipelines={args.category}"], logs / f"run{index}.log"
            )
            runs.append(
                {
                    "pipeline_seconds": pipeline_s,
                    "wall_seconds": wall,
                    "models_reused": output.count("reusing the model saved"),
                    "models_fitted": len(re.findall(r"Fitted \w+ in", output)),
                    "maps_reused_all": output.count("maps reused (same model and images); no forward pass"),
                    "images_preprocessed": [int(n) for n in re.findall(r"wrote (\d+) images in", output)],
                }
            )
            logger.info("run %d: %s", index, runs[-1])
        ratio = runs[1]["pipeline_seconds"] / runs[0]["pipeline_seconds"]
        result = {
            "revision": git_revision(),
            "category": args.category,
            "demo_data": {"pipeline_seconds": demo_s, "wall_seconds": demo_wall},
            "first": runs[0],
            "second": runs[1],
            "ratio_pipeline": ratio,
            "target": "< 0.25, no model fitted in the second run",
            "met": ratio < 0.25 and runs[1]["models_fitted"] == 0,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average": os.getloadavg(),
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        logger.info(
            "Second run: %.1f s of %.1f s (%.0f %%); result in %s",
            runs[1]["pipeline_seconds"],
            runs[0]["pipeline_seconds"],
            100 * ratio,
            args.output,
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
