"""Serving and scale: the inspection model in MLflow, over REST, on a Dask cluster, and with ONNX Runtime.

- :mod:`.pyfunc` — the MLflow pyfunc model (raw base64 images in, decisions out), logging into a run, the registry
  (``madfh-<category>``, the ``champion`` alias, roll-back);
- :mod:`.distributed` — batch inspection of a folder spread over Dask workers (a LocalCluster or a plant's cluster);
- :mod:`.onnx` — PatchCore's feature extractor exported to ONNX and run with ONNX Runtime;
- :mod:`.demo` — a small fitted inspection model built from the synthetic demo scenes (tests, benches, first try);
- ``python -m madfh_pipeline.serving`` — the command line (register, champion, roll back, batch, demo model).

Submodules are imported on demand: MLflow, Dask and ONNX Runtime are not needed by the inspection core.
"""
