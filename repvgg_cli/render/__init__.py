"""Results to Rich tables and trees, JSON documents and Markdown. Decides nothing.

Three rules hold for everything rendered here:

- Text that comes from a checkpoint or the command line (block names, keys, paths, messages) is
  never read as Rich markup (it goes into :class:`rich.text.Text` or is printed with
  ``markup=False``) and is shown on one line (:func:`~.text.printable`), so ``ckpt[best].pt`` stays
  ``ckpt[best].pt`` and a key holding ``[/x]`` or a newline cannot break the output.
- Blocks are listed in natural order (:func:`~.text.natural_key`): ``stages.2.9`` before ``stages.2.10``.
- Tables fit the terminal they are printed on: at 80 columns long block names are shortened at
  the front (the end of a name is what tells blocks apart), long family names in the middle, and
  free text folds.

The package: :mod:`.text` (one-line text, natural order, sizes, tables that fit the terminal;
no torch, the CLI uses it before any command runs), :mod:`.conversion` (the convert report),
:mod:`.key_diff` (its key diff, source -> output), :mod:`.verify` (a re-check, the whole-model
check), :mod:`.inspect` (a checkpoint summary, the families table).
"""
