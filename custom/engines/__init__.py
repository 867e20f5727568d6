"""Engines: Ignite trainers/evaluators (monai.engines), prepare-batch classes, inferers, handlers, checkpoints."""
