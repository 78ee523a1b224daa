"""The base layer: small helpers that every other part of entropylens may import.

Nothing here imports from the rest of the package except :mod:`entropylens.errors` and
:mod:`entropylens._version` (``tests/test_imports.py`` checks it), so any module can use
them without creating an import cycle:

- :mod:`~entropylens.base.steps`: the step column with missing steps as int64;
- :mod:`~entropylens.base.jsonable`: DataFrame rows and numpy scalars as plain JSON values;
- :mod:`~entropylens.base.pieces`: the one decoder of tokenizer pieces (GPT-2 byte table,
  SentencePiece markers, OpenAI byte tokens).
"""
