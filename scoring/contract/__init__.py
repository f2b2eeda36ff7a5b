"""The run contract: workflows, run bodies, uploaded files, and the errors a run can get.

It sits on top of the engine and imports only its public names: :mod:`~scoring.contract.run`
turns a ``POST /r/workflows/{id}/run`` body into a :class:`~scoring.models.DispatchRequest`
(or a ComfyUI Cloud run), :mod:`~scoring.contract.workflow` holds the definitions it is checked
against, :mod:`~scoring.contract.files` the stores that answer for file keys, and
:mod:`~scoring.contract.errors` the stable error codes of DESIGN section 6.
"""

from scoring.contract.errors import ErrorCode, RunError, RunValidationError
from scoring.contract.files import FileInfo, FileStore, InMemoryFileStore, S3FileStore
from scoring.contract.run import (
    DispatchedRun,
    RunRequest,
    ValidatedRun,
    dispatch_run,
    validate_run,
)
from scoring.contract.workflow import ParameterDef, Workflow

__all__ = [
    "DispatchedRun",
    "ErrorCode",
    "FileInfo",
    "FileStore",
    "InMemoryFileStore",
    "ParameterDef",
    "RunError",
    "RunRequest",
    "RunValidationError",
    "S3FileStore",
    "ValidatedRun",
    "Workflow",
    "dispatch_run",
    "validate_run",
]
