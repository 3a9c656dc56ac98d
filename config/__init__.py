"""The recipe schema and user-facing errors: the bottom layer, importing no project code."""
