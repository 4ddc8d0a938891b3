"""ONNX export of the deploy-form model, checked against torch with onnxruntime before it is written.

Where the model comes from (module tree only; an ONNX graph needs the model's forward):

- a pickled model (``--allow-pickle``): train-form blocks are fused in place first (each block and
  the whole model checked, as ``convert`` does); a model already in deploy form is exported as is;
- a state dict and ``MODULE:CALLABLE`` building the **train-form** model: a train-form state dict
  is loaded strictly and fused; a deploy state dict (e.g. written by ``repvgg convert``) is
  loaded strictly into the factory's model after switching it to its deploy structure.

The graph is made by ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter: it needs
no ``onnxscript``), kept in memory, checked with ``onnx.checker`` and run in onnxruntime on
seeded random inputs against the torch deploy model; only a graph that passes is written, atomically.
onnx and onnxruntime are an optional extra (``pip install -e ".[onnx]"`` from a clone).

Options: ``half`` exports the deploy model in float16 (checked against the float32 model, so the
reported error is the whole cost of the cast); ``dynamic`` makes the batch and both spatial axes
symbolic (the second check then runs another batch size and resolution); ``slim`` passes the graph
through onnxslim (an optional extra too) before it is checked, so the graph written is the graph
checked.

The package: :mod:`.graph` (the ONNX graph in memory: export, checker, metadata, onnxslim; shared
with :mod:`repvgg_cli.bench`), :mod:`.model` (the deploy-form model to export), :mod:`.file`
(:func:`~.file.export_file`: options, the onnxruntime check, the result, the write).
"""
