"""Toy and upstream-faithful models, one module per family (see tests/test_family_contract.py)."""

ZOO_OF: dict[str, str] = {}
"""Family name -> zoo module, where one upstream model holds several families."""
