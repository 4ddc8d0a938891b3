"""Reading and writing checkpoints (no torch import here: the CLI imports :mod:`.digest` early).

Reading:

* :mod:`.read` — :func:`~.read.load_checkpoint`: the format by its bytes, safe loading, the entry,
  the source watched until the conversion is done (:func:`~.read.source_unchanged`);
* :mod:`.unpickle` — ``torch.load`` that runs no code from the file unless allowed;
* :mod:`.ziprecords` — a torch zip's records as stored: mmap only when every record is plain;
* :mod:`.mapguard` — a memory-mapped source truncated mid-read gives zeros and a flag, not SIGBUS;
* :mod:`.contents` — which tensors and containers a checkpoint may hold (dense, real dtypes, depth);
* :mod:`.containers` — which container entry holds the weights, prefixes to strip;

Writing:

* :mod:`.limits` — an output's bytes, aliasing and safetensors header, known before any work;
* :mod:`.atomic` — the one writer of every path: temporary file, fsync, no-replace move, signals;
* :mod:`.write` — state dicts, pickled models and reports on top of :mod:`.atomic`;
* :mod:`.safetensors_file` — the safetensors writer, whole or streamed;
* :mod:`.metadata` — what a deploy file records, digests, checks before trusting it;
* :mod:`.digest` — a file's sha256, computed on a second core.
"""
