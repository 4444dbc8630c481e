"""``python -m hf_concept_ablation``: the ``hf-concept-ablation`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
