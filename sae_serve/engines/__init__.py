"""Engines that run a model with the steering hook."""
