"""Demo and test aids of the trainer, not product code: tiny offline components
(`components.py`, written by `trainer init-components` for `make demo`) and
labelled coloured-shape images whose captions can be checked from their pixels
(`shapes.py`)."""
