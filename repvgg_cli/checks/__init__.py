"""The numbers behind every verdict, in float64 (no torch import beyond what each module needs).

* :mod:`.tolerance` — tolerances and the result records (``BlockCheck``, ``ModelCheck``);
* :mod:`.forward` — the train form run as the ops it stands for, the fused conv as shipped;
* :mod:`.probe` — seeded per-block probes, the centre products taken during fusion, ``check_block``;
* :mod:`.model` — whole-model outputs of the train and deploy forms.
"""

from .forward import branch_geometry, fused_forward, reference_forward
from .model import compare_outputs, flatten_outputs, infer_input_shape, model_outputs
from .probe import (
    GEOMETRY_CHANNELS,
    CentreProbe,
    block_probe,
    block_seed,
    branches_probe,
    check_block,
    fused_probe,
    geometry_channels,
    reference_probe,
)
from .tolerance import (
    DEFAULT_RTOL,
    BlockCheck,
    ModelCheck,
    Tolerance,
    compare,
    decode_tensor,
    default_rtol,
    encode_tensor,
)

__all__ = [
    "DEFAULT_RTOL", "GEOMETRY_CHANNELS", "BlockCheck", "CentreProbe", "ModelCheck", "Tolerance", "block_probe",
    "block_seed", "branch_geometry", "branches_probe", "check_block", "compare", "compare_outputs",
    "decode_tensor", "default_rtol", "encode_tensor", "flatten_outputs", "fused_forward", "fused_probe",
    "geometry_channels", "infer_input_shape", "model_outputs", "reference_forward", "reference_probe",
]
