"""The Open Inference Protocol (KServe v2, as Triton Inference Server speaks it), as the service speaks it beside its
native API: the paths, the JSON shapes, the datatypes and the parameter names, written once for both sides.

A teacher is a v2 model of one version, "1": its ensemble members are not versions, since a version answers on its
own while a teacher's members answer together (their versions, the weights' hashes, are in each answer's
X-Teacher-Versions header, as on the native route). Its one input is `inputs` (UINT8, FP16 or FP32 rows, as the native
API takes them); its outputs are `probs`, `logits` and `member_logits` (FP32). The request's `parameters` carry the
native query's `temperature` and `cache`.

The names here are the standard library's, for the client (`shared.client`, which imports no pydantic); the JSON
shapes, as pydantic models for the service, are in shared/oip_models.py.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/ and Triton's binary-data and
shared-memory extensions (https://github.com/triton-inference-server/server/tree/main/docs/protocol).
"""

from __future__ import annotations

V2 = "/v2"
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
MODEL_PATH = "/v2/models/{model}"
MODEL_VERSION_PATH = "/v2/models/{model}/versions/{version}"
SHM_PATH = "/v2/systemsharedmemory"

# the one version of every teacher
MODEL_VERSION = "1"

# the binary tensor extension: the JSON part's length, the rest of the body being the tensors' bytes in input order
HEADER_INFER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"

# the system shared-memory extension, on an input or an output
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_BYTE_SIZE = "shared_memory_byte_size"

# request parameters: the native query's
TEMPERATURE = "temperature"
CACHE = "cache"

EXTENSIONS = ["binary_tensor_data", "system_shared_memory"]

# v2 datatype -> the native API's dtype name (shared.wire.INPUT_DTYPES); outputs are FP32
INPUT_DATATYPES = {"UINT8": "uint8", "FP16": "float16", "FP32": "float32"}
OUTPUT_DATATYPE = "FP32"
