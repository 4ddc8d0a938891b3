"""Toy and upstream-faithful models, one module per family (see tests/test_family_contract.py)."""

ZOO_OF: dict[str, str] = {
    "unireplknet_ffn": "unireplknet",
    "apple_repmixer": "apple_fastvit",
    "apple_repcpe": "apple_fastvit",
    "dbb_convbn": "dbb",
    "orepa_1x1": "orepa",
    "orepa_large": "orepa",
    "orepa_large_base": "orepa",
    "orepa_repvgg": "orepa",
    "timm_ghostv3_primary": "timm_ghostv3",
    "timm_ghostv3_cheap": "timm_ghostv3",
    "timm_ghostv3_dw": "timm_ghostv3",
    "timm_efficientvim_conv": "timm_efficientvim",
    "timm_efficientvim_dwconv": "timm_efficientvim",
    "timm_levit_convnorm": "timm_levit",
    "timm_levit_linearnorm": "timm_levit",
    "timm_normlinear": "timm_levit",
    "timm_convnorm": "timm_efficientvit",
    "timm_c_bn": "timm_repvit",
    "timm_repvggdw": "timm_repvit",
    "timm_repvit_classifier": "timm_repvit",
    "timm_shvit_residual": "timm_shvit",
    "timm_shvit_normlinear": "timm_shvit",
    "timm_iformer_repcpe": "timm_iformer",
}
"""Family name -> zoo module, where one upstream model holds several families."""
