"""Toy models for the `official` family's contract tests (grouped, strided, identity, SE)."""

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 32, 32)


def train_model():
    return zoo.randomize_bn(zoo.repvgg("tiny_g2", num_classes=10, use_se=True), seed=12).eval()


def deploy_model():
    return zoo.repvgg("tiny_g2", num_classes=10, use_se=True, deploy=True).eval()
