"""CAFT on the gender-bias task: learn pronoun grammar, not the profession's stereotyped gender.

Run: ``accelerate launch recipes/gender_bias.py [--config recipes/configs/gender_bias.yaml] [key=value ...]``
(or plain ``python``); the same as ``hf-concept-ablation train gender_bias``. ``--help`` lists every setting and
its default. The recipe itself: `hf_concept_ablation.experiments.recipes.gender_bias`.
"""

import sys

from hf_concept_ablation.cli import run_recipe_script

if __name__ == "__main__":
    sys.exit(run_recipe_script("gender_bias", __file__))
