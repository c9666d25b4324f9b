"""Print an image's runtime requirements from pyproject.toml: the project's dependencies, with
- ``cpu`` (the worker image): onnxruntime instead of onnxruntime-gpu (no CUDA libraries), and without pyarrow
  (170 MB installed, used only by `slidr score` and `slidr import table` for Parquet, which the worker never runs);
- ``gpu``: the dependencies as pyproject has them (onnxruntime-gpu), pyarrow left out likewise;
- ``gpu-train``: ``gpu`` plus the training extra (torch, onnx, cvxpy...): the retrain job's image.
"""

import sys
import tomllib
from pathlib import Path

variant = sys.argv[2] if len(sys.argv) > 2 else "cpu"
project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
deps = list(project["dependencies"])
if variant == "gpu-train":
    deps += project["optional-dependencies"]["train"]
for dep in deps:
    if dep.startswith("pyarrow"):
        continue
    if variant == "cpu" and dep.startswith("onnxruntime-gpu"):
        dep = "onnxruntime" + dep[len("onnxruntime-gpu"):]
    print(dep)
