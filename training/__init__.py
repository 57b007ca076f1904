"""The digital brain world, datasets, training loop, evaluation and model packaging."""
