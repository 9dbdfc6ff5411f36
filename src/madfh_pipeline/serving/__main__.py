"""Command line of the serving tools: ``python -m madfh_pipeline.serving <command>``.

    demo-model OUT [--category sheet_metal] [--runtime onnx]   fit a small demo inspection model into folder OUT
    register FOLDER [--experiment madfh_serving] [--run-id ID] [--champion if_missing|always|never]
    list NAME                                                   versions and champion of madfh-<category>
    champion NAME VERSION                                       point the champion alias at VERSION
    rollback NAME [--to VERSION]                                champion back to the previous (or given) version
    batch MODEL FOLDER [--scheduler ADDRESS] [--workers 2] [--out records.parquet] [--maps-dir DIR]

The tracking / registry store is MLflow's usual one: ``MLFLOW_TRACKING_URI`` (``sqlite:///mlflow.db`` in this
project, as in conf/base/mlflow.yml). ``batch`` is a process of its own, so it may start a LocalCluster (see
:mod:`.distributed`); MODEL is an inspection folder or an MLflow model URI (``models:/madfh-<category>@champion``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("madfh_pipeline.serving")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m madfh_pipeline.serving", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-model", help="fit a small demo inspection model (synthetic scenes)")
    demo.add_argument("out", type=Path)
    demo.add_argument("--category", default="sheet_metal")
    demo.add_argument("--width", type=int, default=96)
    demo.add_argument("--height", type=int, default=80)
    demo.add_argument("--channels", type=int, default=1, choices=(1, 3))
    demo.add_argument("--runtime", default="torch", choices=("torch", "onnx"))

    register = commands.add_parser("register", help="log an inspection folder into a run and register a version")
    register.add_argument("folder", type=Path)
    register.add_argument("--experiment", default="madfh_serving")
    register.add_argument("--run-id", default=None)
    register.add_argument("--name", default=None, help="registered model name (default madfh-<category>)")
    register.add_argument("--champion", default="if_missing", choices=("if_missing", "always", "never"))

    listing = commands.add_parser("list", help="versions and champion of a registered model")
    listing.add_argument("name")

    champion = commands.add_parser("champion", help="point the champion alias at a version")
    champion.add_argument("name")
    champion.add_argument("version", type=int)

    rollback = commands.add_parser("rollback", help="champion back to the previous (or given) version")
    rollback.add_argument("name")
    rollback.add_argument("--to", type=int, default=None)

    batch = commands.add_parser("batch", help="inspect a folder of images on a Dask cluster")
    batch.add_argument("model", help="inspection folder or MLflow model URI")
    batch.add_argument("folder", type=Path)
    batch.add_argument("--scheduler", default=None, help="Dask scheduler address; none: a LocalCluster")
    batch.add_argument("--workers", type=int, default=2)
    batch.add_argument("--chunk-size", type=int, default=1)
    batch.add_argument("--maps-dir", type=Path, default=None)
    batch.add_argument("--out", type=Path, default=None, help="records as .parquet or .csv")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a refused request (unknown version, nothing to roll back to, bad folder) exits with 2 and
    its message, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo-model":
        from madfh_pipeline.serving.demo import build_demo_model

        model = build_demo_model(
            category=args.category,
            width=args.width,
            height=args.height,
            channels=args.channels,
            settings={"runtime": args.runtime},
        )
        model.save(args.out)
        return 0
    if args.command == "batch":
        from madfh_pipeline.serving.distributed import inspect_folder

        records = inspect_folder(
            args.model, args.folder, args.scheduler, args.workers, chunk_size=args.chunk_size, maps_dir=args.maps_dir
        )
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            records.to_csv(args.out, index=False) if args.out.suffix == ".csv" else records.to_parquet(args.out)
            logger.info("Wrote %d records to %s.", len(records), args.out)
        else:
            sys.stdout.write(records.drop(columns=["explanation", "regions"]).to_string() + "\n")
        return 1 if (records["error_kind"] == "model").any() else 0

    import mlflow

    from madfh_pipeline.serving import pyfunc as P

    if args.command == "register":
        from madfh_pipeline.inspection import InspectionModel

        model = InspectionModel.load(args.folder)
        run_id = args.run_id
        if run_id is None:
            experiment = mlflow.set_experiment(args.experiment)
            run = mlflow.MlflowClient().create_run(
                experiment.experiment_id, run_name=f"register {model.version}", tags={"category": model.category.name}
            )
            run_id = run.info.run_id
        logged = P.log_inspection_model(model, registered_model_name=args.name, run_id=run_id, champion=args.champion)
        if args.run_id is None:
            mlflow.MlflowClient().set_terminated(run_id)
        sys.stdout.write(P.dumps(logged.__dict__) + "\n")
    elif args.command == "list":
        sys.stdout.write(P.dumps(P.describe_model(args.name)) + "\n")
    elif args.command == "champion":
        P.set_champion(args.name, args.version)
    elif args.command == "rollback":
        version = P.rollback(args.name, args.to)
        sys.stdout.write(f"{args.name}: champion is now version {version}; restart the server to serve it.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
