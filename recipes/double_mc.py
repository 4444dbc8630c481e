"""CAFT on double multiple choice: answer the intended question, ignore the other one.

Run: ``accelerate launch recipes/double_mc.py [--config recipes/configs/double_mc.yaml] [key=value ...]``
(or plain ``python``); the same as ``hf-concept-ablation train double_mc``. ``--help`` lists every setting and
its default. The recipe itself: `hf_concept_ablation.experiments.recipes.double_mc`.
"""

import sys

from hf_concept_ablation.cli import run_recipe_script

if __name__ == "__main__":
    sys.exit(run_recipe_script("double_mc", __file__))
