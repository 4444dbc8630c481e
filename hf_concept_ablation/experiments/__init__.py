"""Experiments: Trainer fine-tuning with the ablation, the conditions of a run (plain, CAFT, controls) and their
results file, the recipes (`recipes`, their settings in `recipe_settings`), the demo, the report and model card,
and the whole study."""
