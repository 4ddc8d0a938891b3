"""Compare checkpoints: key by key, or by what their re-parameterizable blocks compute.

Three questions, three functions, each returning dataclasses (nothing here prints):

* :func:`~.compare.diff_states` — two state dicts key by key: keys only in A, only in B, and for keys in
  both their shapes, dtypes, bit identity and max abs / max rel difference.
* :func:`~.files.diff_files` — two checkpoint files. When one is a train form and the other a deploy
  form of the same model, the train side is fused with :func:`repvgg_cli.api.convert_state_dict`
  and each fused block is compared with the other file's tensors under the same deploy names
  (so a deploy file written by a project's own ``switch_to_deploy()`` — e.g. RepVGG's
  ``repvgg_model_convert`` in DingXiaoH/RepVGG ``repvgg.py``, or timm's
  ``timm.utils.reparameterize_model`` in huggingface/pytorch-image-models
  ``timm/utils/model.py`` — is checked block by block against this tool's fusion); otherwise
  key by key.
* :func:`~.conversion.key_diff` — what a conversion did to a state dict: per block the keys removed and
  added (shape, dtype), the keys outside blocks proven bit-identical by comparing their bytes,
  the training-only keys dropped, and bytes before → after (for the convert report).

Tolerances follow the tool's rule (see :class:`repvgg_cli.checks.tolerance.Tolerance`): a tensor pair
agrees iff ``max|a - b| <= atol + rtol * scale`` with ``scale`` the largest finite ``|value|``
of either tensor; with ``rtol == atol == 0`` agreement means bit identity. A different shape or
dtype never agrees.

The package, from the bottom up: :mod:`.compare` (names, one pair of tensors, two state dicts key
by key, and their JSON), :mod:`.conversion` (:func:`~.conversion.key_diff`, what the report stage
of a conversion records), :mod:`.files` (:func:`~.files.diff_files`: two files, a train-form side
fused through :mod:`repvgg_cli.api`). Only :mod:`.files` sits above the pipeline.
"""
