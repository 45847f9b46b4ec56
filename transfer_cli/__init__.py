"""transfer-cli: a config-driven runner for transfer-learning experiments."""

__version__ = "0.1.0"
