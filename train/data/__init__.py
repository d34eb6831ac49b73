"""Input pipelines: TFDS builders and grain pipelines."""
