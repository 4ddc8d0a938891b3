"""Toy models for the `yolov6_convmodule` family: the tiny YOLOv6 detector of :mod:`.yolov6`.

Its train form has ConvModules (``X.block.conv`` + ``X.block.bn``) around YOLOv6 RepVGGBlocks
(the ``official`` family, same keys); its deploy form is what YOLOv6's deploy path leaves
(``fuse_model`` then ``switch_to_deploy``): every ConvModule folded, every RepVGGBlock fused.
"""

from __future__ import annotations

from . import yolov6

EPS = yolov6.EPS
INPUT_SHAPE = yolov6.INPUT_SHAPE
FAMILIES = {"official", "yolov6_convmodule"}


def train_model():
    return yolov6.train_model("repvgg")


def deploy_model():
    return yolov6.deploy_model("repvgg")
