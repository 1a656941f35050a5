"""disttrain: training for long sequences and huge models, driven by a planner."""

__version__ = "0.1.0"
