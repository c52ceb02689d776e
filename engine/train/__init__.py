"""Training the embedded model: corpus, rows, objective, trainer, the GPU run, its record."""
