"""Toy models for the `plain` family's contract tests."""

from tests import zoo

EPS = 1e-5
INPUT_SHAPE = (2, 3, 16, 16)


def train_model():
    return zoo.randomize_bn(zoo.PlainNet(), seed=11).eval()


def deploy_model():
    return zoo.PlainNet(deploy=True).eval()
