"""Evaluation: trait definitions, generation, judging and activation steering."""
