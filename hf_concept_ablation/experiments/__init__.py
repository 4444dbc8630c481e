"""Experiments: Trainer fine-tuning with the ablation, the conditions of a run (plain, CAFT, controls) and their
results file, the recipes' settings, the report and model card, and the whole study."""
