"""Latency of a model's train-form forward pass against its fused deploy form, side by side.

The model is timed as it comes (train form, eval mode), then switched to its deploy form **in
place** by :func:`repvgg_cli.api.reparameterize` (which also runs the whole-model check),
then timed again on the same input. The benchmark itself never copies the model; the
whole-model check casts a temporary float64 copy of it, one at a time, and drops it.

Each form's passes are timed one by one; the report gives each form's median and spread
(interquartile range, min-max) and the speedup with a 95% interval from a seeded bootstrap of the
two forms' samples (resampled with replacement, the ratio of medians each time), and calls the
comparison inconclusive when that interval includes 1. The two forms run one after the other (the
model is fused in place between them), so their passes cannot be paired.

With ``onnx=True`` the train form is also exported to ONNX before fusing, and the deploy form after,
and both graphs are timed in onnxruntime with all its graph optimizations on
(``ORT_ENABLE_ALL``, which folds conv+BN itself): what the conversion buys beyond the runtime's
own folding.

No printing here: :func:`~.run.bench_model` returns a frozen :class:`~.results.BenchResult`; the CLI renders it;
progress goes through an optional :class:`~.results.Steps` object.

The package: :mod:`.results` (options, timings, the bootstrap interval, the result), :mod:`.run`
(the model loaded, both forms timed in torch and, with ``onnx``, in onnxruntime).
"""
