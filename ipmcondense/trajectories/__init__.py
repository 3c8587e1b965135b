"""Expert trajectories for trajectory matching: training them (:func:`train_experts`) and reading them back
(:class:`ExpertBuffer`). The differentiable unroll lives in :mod:`ipmcondense.autodiff`, the MTT loss in
:mod:`ipmcondense.condensation.objectives.trajectory`.
"""

from .buffer import (
    BUFFER_FORMAT,
    BUFFER_FORMAT_VERSION,
    BUFFER_METADATA_FILE,
    ExpertBuffer,
    ExpertBufferMismatchError,
    ExpertBufferNotFoundError,
    ExpertSample,
    expert_file_name,
)
from .experts import ExpertTrainingReport, train_experts

__all__ = [
    "train_experts",
    "ExpertTrainingReport",
    "ExpertBuffer",
    "ExpertSample",
    "ExpertBufferNotFoundError",
    "ExpertBufferMismatchError",
    "BUFFER_METADATA_FILE",
    "BUFFER_FORMAT",
    "BUFFER_FORMAT_VERSION",
    "expert_file_name",
]
