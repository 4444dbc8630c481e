"""The demo (``make demo`` = ``hf-concept-ablation demo``): the whole CAFT pipeline on the embedded Gemma 3 270M, at a
size that runs on two CPU cores in about a quarter of an hour:

1. concept search on the gender-bias task (attribution of the shipped SAEs' latents,
   contrast with female/male sentences, selection) -> a saved adapter, and its erasure check;
2. plain fine-tuning and CAFT with that adapter (the gender recipe's quick config, ``gender_bias_quick``),
   evaluated on validation and OOD data with the ablation removed;
3. a results JSON, a figure, a table and a model card.

Finished steps are kept, so a second run only redoes what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..search.config import SearchConfig

QUICK_CONFIG = "gender_bias_quick"  #: the packaged recipe config the demo trains with
#: the demo's search settings (`SearchConfig` fields), which the caller's may change
DEMO_SEARCH: Mapping[str, Any] = {"max_examples": 64, "batch_size": 16, "min_contrast": 0.5}


def run_demo(out: str | Path, model: str = "embedded", search: Mapping[str, Any] | None = None,
             threads: int | None = None, command: str | None = None) -> dict:
    """Search for the gender concept into ``<out>/search``, then run the quick gender recipe into `out` with the
    adapter found; return the recipe's results.

    `model`: the embedded default, a Hub id or a local folder (another model needs its SAEs in `search`, e.g.
    ``{"saes": {6: PATH}, "layers": [6]}``; `search` settings take precedence over `DEMO_SEARCH`). `threads`: torch
    CPU threads of the search. `command`: how the demo was started, for the model card (default: the recipe command
    line it runs)."""
    from ..search.pipeline import run_search_once, search_finished
    from .recipes import run_recipe

    out = Path(out)
    search_dir = out / "search"
    config = SearchConfig(task="gender_bias", out=str(search_dir), **{"model": model, "threads": threads, **DEMO_SEARCH,
                                                                      **(search or {})})
    print(f"== 1/2 concept search: reusing {search_dir}" if search_finished(search_dir) else
          f"== 1/2 concept search -> {search_dir}", flush=True)
    if not run_search_once(config):
        raise ValueError(f"the concept search selected nothing (see {search_dir / 'selection.json'}): lower "
                         "min_contrast, or try other layers")
    print("== 2/2 fine-tuning: plain and CAFT", flush=True)
    return run_recipe("gender_bias", QUICK_CONFIG, [
        f"adapter={search_dir}", f"attribution={search_dir / 'attribution.json'}", f"output_dir={out}",
        f"model={model}"], command=command)


def default_output_dir(model: str) -> Path:
    """The demo's output folder for `model`: each model its own, since a results folder refuses another model's runs."""
    return Path("outputs/demo") if model == "embedded" else Path(f"outputs/demo-{Path(model).name}")
