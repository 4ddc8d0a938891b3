"""Former home of the conversion code, now :mod:`repvgg_cli.pipeline` and :mod:`repvgg_cli.api`.

Kept importable while the rest of the tree moves over (removed before the release).
"""

from __future__ import annotations

from .api import convert_state_dict, reparameterize  # noqa: F401
from .pipeline.check import BlockResult  # noqa: F401
from .pipeline.find import ConvBnPair, find_conv_bn_pairs, find_module_blocks  # noqa: F401
from .pipeline.fuse import CONV_BN  # noqa: F401
from .pipeline.metadata import block_record, metadata_reserve  # noqa: F401
from .pipeline.options import ConvertOptions  # noqa: F401
from .pipeline.read import build_model, load_factory  # noqa: F401
from .pipeline.report import ConversionResult, block_notes  # noqa: F401
from .pipeline.write import Progress, planned_deploy_state  # noqa: F401
from .pipeline.fuse import planned_weight_shape  # noqa: F401


def build_metadata(result, source_name, source_sha256, entry, stripped):  # noqa: ANN001 - old signature
    """The metadata of ``result`` as a deploy file records it (see :func:`pipeline.metadata.build_metadata`)."""
    from .pipeline.metadata import build_metadata as build

    return build(mode=result.mode, options=result.options, blocks=result.blocks, dropped=result.dropped_keys,
                 model_check=result.model_check, source_name=source_name, source_sha256=source_sha256,
                 entry=entry, stripped=stripped)
