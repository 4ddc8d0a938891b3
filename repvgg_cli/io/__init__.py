"""Reading and writing checkpoints (no torch import here: the CLI imports :mod:`.digest` early).

* :mod:`.read` — :func:`~.read.load_checkpoint`: the format by its bytes, safe loading, the entry;
* :mod:`.unpickle` — ``torch.load`` that runs no code from the file unless allowed;
* :mod:`.containers` — which container entry holds the weights, prefixes to strip;
* :mod:`.metadata` — what a deploy file records, digests, checks before trusting it;
* :mod:`.write` — atomic, no-replace writes of state dicts, pickled models and reports;
* :mod:`.safetensors_file` — the safetensors writer, whole or streamed;
* :mod:`.digest` — a file's sha256, computed on a second core.
"""
