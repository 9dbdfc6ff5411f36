"""MLflow "models from code" entry point of the inspection model: the only code a logged model holds.

MLflow copies this file into the logged model and runs it on load; it names our wrapper class and nothing else. The
model's learnt content travels as JSON + safetensors (+ an ONNX graph) in the ``inspection`` artifact, so no pickle is
written or read anywhere (a cloudpickled ``python_model.pkl`` is what MLflow writes otherwise).
"""

from mlflow.models import set_model

from madfh_pipeline.serving.pyfunc import InspectionPyfunc

set_model(InspectionPyfunc())
