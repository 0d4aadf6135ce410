"""Datasets to batches: tfds preparation (`prepare`), per-example transforms
(`transforms`), the train and eval streams (`input_pipeline`), and the two
datasets built from local files (`fashion_mnist`, `digits`)."""
