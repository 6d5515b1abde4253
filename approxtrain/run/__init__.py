"""A training run around the core: the results schema, run-dir files, the trainer and its callbacks."""
