"""Training engine: recipe -> composer Trainer. Everything composer-specific lives in this package.

Importing the package is cheap; composer is imported by the modules that need it.
"""
from modernbert_train.train.recipe import Recipe, load_recipe


def train(recipe: Recipe):
    """Run a recipe to its max_duration (resuming from the newest checkpoint if autoresume is on)."""
    from modernbert_train.train.trainer import train as _train

    return _train(recipe)


__all__ = ["Recipe", "load_recipe", "train"]
