"""Real datasets that load offline from pip packages."""

from .mnist import batches, load_mnist, mnist_for_imagenet_model
from .text import load_movie_reviews, tokenize_batch

__all__ = ["batches", "load_mnist", "mnist_for_imagenet_model", "load_movie_reviews", "tokenize_batch"]
