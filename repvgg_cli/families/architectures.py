"""Whole-model architectures, recognised from the whole key layout of a state dict.

A block's own keys cannot always tell which project wrote it: YOLOv6's ``RepVGGBlock`` has the
official RepVGG block's keys exactly, but YOLOv6 builds every BN with eps 1e-3; timm's LeViT and
EfficientViT fold conv→BN pairs that other timm models keep. An :class:`Architecture` is
recognised when every one of its marker patterns matches some key of the checkpoint. It then
gives the eps of the project's BNs (over the family defaults) and switches on the families that
only make sense inside it.

Add one: an entry in :data:`ARCHITECTURES` (most specific first), with the upstream file that
decides its markers and its eps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """A model family recognised from its whole key layout.

    Attributes:
        name: short name, shown in reports ("yolov6").
        title: what it is.
        source: the upstream file whose module names the markers follow.
        markers: regular expressions; every one must match (``re.search``) at least one key.
        eps: the BN eps the project builds every BN with; None: the families' own defaults.
        families: families switched on only inside this architecture (their layout is generic
            elsewhere, e.g. a conv→BN pair the project itself folds).
    """

    name: str
    title: str
    source: str
    markers: tuple[str, ...]
    eps: float | None = None
    families: tuple[str, ...] = ()

    def matches(self, keys: Iterable[str]) -> bool:
        keys = keys if isinstance(keys, (list, tuple)) else list(keys)
        return all(any(map(re.compile(marker).search, keys)) for marker in self.markers)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="yolov6",
        title="YOLOv6 (EfficientRep backbone, Rep-PAN neck, EffiDeHead)",
        source="meituan/YOLOv6 yolov6/models/efficientrep.py, reppan.py, effidehead.py; "
               "yolov6/utils/torch_utils.py initialize_weights (BN eps 1e-3)",
        markers=(r"^backbone\.(stem|ERBlock_[2-6])\.", r"^neck\.", r"^detect\."),
        eps=1e-3,
    ),
    Architecture(
        name="yolov7",
        title="YOLOv7 (numbered model layers, RepConv, IDetect)",
        source="WongKinYiu/yolov7 models/yolo.py, models/common.py; utils/torch_utils.py initialize_weights "
               "(BN eps 1e-3)",
        markers=(r"^model\.\d+\.(conv\.weight|rbr_dense\.0\.weight)$", r"^model\.\d+\.(anchor_grid|ia\.\d+\.implicit)$"),
        eps=1e-3,
    ),
    Architecture(
        name="apple_fastvit",
        title="apple ml-fastvit FastViT (stem patch_embed, network of RepMixer/attention stages)",
        source="apple/ml-fastvit models/fastvit.py (convolutional_stem, RepMixerBlock, AttentionBlock; BN eps 1e-5)",
        markers=(r"(^|\.)patch_embed\.0\.(rbr_conv\.0\.conv|reparam_conv)\.weight$",
                 r"(^|\.)network\.\d+\.\d+\.token_mixer\."),
        families=("apple_repcpe",),
    ),
    Architecture(
        name="dbb",
        title="Diverse Branch Block models (ResNet, MobileNet with DiverseBranchBlock)",
        source="DingXiaoH/DiverseBranchBlock diversebranchblock.py, convnet_utils.py (ConvBN; BN eps 1e-5); "
               "JUGGHM/OREPA_CVPR2022 blocks.py DBB",
        markers=(r"(^|\.)dbb_origin\.conv\.weight$", r"(^|\.)dbb_1x1_kxk\.(idconv1|conv1)\.weight$"),
        eps=1e-5,
        families=("dbb_convbn",),
    ),
    Architecture(
        name="orepa",
        title="OREPA models (ResNet, ResNeXt, RepVGG with OREPA blocks)",
        source="JUGGHM/OREPA_CVPR2022 blocks.py, blocks_repvgg.py, basic.py (ConvBN; BN eps 1e-5)",
        markers=(r"(^|\.)(weight_orepa_origin|weight_or1x1_origin|rbr_dense\.weight_rbr_origin)$", r"(^|\.)vector$"),
        eps=1e-5,
        families=("dbb_convbn", "orepa_large_base"),
    ),
    Architecture(
        name="efficientvim",
        title="timm EfficientViM (ConvLayer2d conv+BN, gated depthwise residuals)",
        source="huggingface/pytorch-image-models timm/models/efficientvim.py (Stem, EfficientViMBlock alpha, "
               "HSMSSD BCdt_proj; BN eps 1e-5)",
        markers=(r"(^|\.)patch_embed\.conv\.\d+\.conv\.weight$", r"(^|\.)stages\.\d+\.blocks\.\d+\.alpha$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.mixer\.BCdt_proj\.conv\.weight$"),
        eps=1e-5,
        families=("timm_efficientvim_conv", "timm_efficientvim_dwconv"),
    ),
    Architecture(
        name="nextvit",
        title="timm NextViT (pre-BNs merged into mlp.fc1 and e_mhsa.q/k/v; its conv+BN pairs kept)",
        source="huggingface/pytorch-image-models timm/models/nextvit.py (ConvNormAct stem, NextConvBlock mhca, "
               "ConvMlp; BN eps 1e-5)",
        markers=(r"(^|\.)stem\.\d+\.norm\.running_var$", r"(^|\.)stages\.\d+\.blocks\.\d+\.mhca\.group_conv3x3\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.mlp\.fc1\.weight$"),
        eps=1e-5,
        families=("timm_nextvit",),
    ),
    Architecture(
        name="levit",
        title="timm LeViT / LeViT-conv (ConvNorm, LinearNorm, NormLinear heads)",
        source="huggingface/pytorch-image-models timm/models/levit.py (Stem16/Stem8 conv1.., Attention, "
               "AttentionDownsample, LevitMlp; BN eps 1e-5)",
        markers=(r"(^|\.)stem\.conv1\.linear\.weight$", r"(^|\.)stages\.\d+\.blocks\.\d+\.attn\.attention_biases$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.attn\.qkv\.linear\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.mlp\.ln1\.bn\.running_var$"),
        eps=1e-5,
        families=("timm_levit_convnorm", "timm_levit_linearnorm", "timm_normlinear"),
    ),
    Architecture(
        name="efficientvit_msra",
        title="timm EfficientViT (MSRA) (ConvNorm, NormLinear head)",
        source="huggingface/pytorch-image-models timm/models/efficientvit_msra.py (PatchEmbedding conv1.., "
               "CascadedGroupAttention qkvs/dws, ResidualDrop dw0; BN eps 1e-5)",
        markers=(r"(^|\.)patch_embed\.conv1\.conv\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.mixer\.m\.attn\.qkvs\.\d+\.conv\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.mixer\.m\.attn\.attention_biases$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.dw0\.m\.conv\.weight$"),
        eps=1e-5,
        families=("timm_convnorm", "timm_normlinear"),
    ),
    Architecture(
        name="tiny_vit",
        title="timm TinyViT (ConvNorm)",
        source="huggingface/pytorch-image-models timm/models/tiny_vit.py (PatchEmbed conv1/conv2, MBConv, "
               "TinyVitBlock local_conv, Attention; BN eps 1e-5)",
        markers=(r"(^|\.)patch_embed\.conv1\.conv\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.conv2\.conv\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.local_conv\.conv\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.attn\.attention_biases$"),
        eps=1e-5,
        families=("timm_convnorm",),
    ),
    Architecture(
        name="repvit",
        title="timm RepViT (ConvNorm c/bn, RepVggDw token mixers, RepVitClassifier head)",
        source="huggingface/pytorch-image-models timm/models/repvit.py (RepVitStem conv1/conv2, RepViTBlock "
               "token_mixer; BN eps 1e-5)",
        markers=(r"(^|\.)stem\.conv1\.c\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.token_mixer\.conv\.c\.weight$"),
        eps=1e-5,
        families=("timm_c_bn", "timm_repvggdw", "timm_repvit_classifier"),
    ),
    Architecture(
        name="shvit",
        title="timm SHViT (Conv2dNorm c/bn, Residual depthwise convs, NormLinear head)",
        source="huggingface/pytorch-image-models timm/models/shvit.py (patch_embed Conv2dNorm, BasicBlock "
               "conv Residual; BN eps 1e-5)",
        markers=(r"(^|\.)patch_embed\.0\.c\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.conv\.m\.c\.weight$"),
        eps=1e-5,
        families=("timm_c_bn", "timm_shvit_residual", "timm_shvit_normlinear"),
    ),
    Architecture(
        name="iformer",
        title="timm iFormer (ConvNorm c/bn, RepCPE, RepVitClassifier head)",
        source="huggingface/pytorch-image-models timm/models/iformer.py (Stem conv1..conv3, ConvBlock mixer "
               "Residual; BN eps 1e-5)",
        markers=(r"(^|\.)stem\.conv3\.c\.weight$",
                 r"(^|\.)stages\.\d+\.blocks\.\d+\.mixer\.module\.(\d+|q)\.c\.weight$"),
        eps=1e-5,
        families=("timm_c_bn", "timm_iformer_repcpe", "timm_repvit_classifier"),
    ),
)


def detect_architecture(keys: Iterable[str]) -> Architecture | None:
    """The first architecture of :data:`ARCHITECTURES` whose markers all match, else None."""
    keys = list(keys)
    return next((a for a in ARCHITECTURES if a.matches(keys)), None)
