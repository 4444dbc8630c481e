"""How much of the unintended concept survives the ablation: linear probes on the base model's residual stream.

verbs|sentiment|verbs, val + OOD prompts (600; there the unintended answer's letter is independent of the
intended one). Labels: the sentiment value ('positive'/'negative') and the letter the sentiment answer points
to. Features: the residual stream at the last prompt token after layers 6 and 12, without and with the 75-latent
ablation of the 16k layer-6 SAE (and the 20 shipped-suite latents of the default search). 5-fold CV accuracy.

Usage: ``python scripts/concept_probe.py [ADAPTER_DIR ...]`` (each adapter folder is probed with its ablation on).
"""
import sys
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from hf_concept_ablation import ConceptAblation
from hf_concept_ablation.tasks.evaluation import encode_prompts
from hf_concept_ablation.loading import load_model
from hf_concept_ablation.adapter.residuals import residual_stream
from hf_concept_ablation.tasks import build_double_mc_datasets

torch.set_num_threads(2)
model, tok = load_model("embedded")
d = build_double_mc_datasets("verbs", "sentiment", "verbs")
rows = [r for split in ("val", "ood") for r in d[split]]
value = np.array([r["correct_second"] == "positive" for r in rows])


def unintended_letter(r):  # the option whose second part is the correct sentiment answer
    lines = r["prompt"].split("\n")
    a = next(l for l in lines if l.startswith("A."))
    return 0 if a.rstrip().endswith(r["correct_second"]) else 1


letter = np.array([unintended_letter(r) for r in rows])
intended = np.array([r["answer_index"] for r in rows])
print("unintended letter == intended letter share:", (letter == intended).mean())

def features(layers=(6, 12)):
    out = {l: [] for l in layers}
    for i in range(0, len(rows), 32):
        batch = encode_prompts(tok, [r["prompt"] for r in rows[i:i + 32]])
        acts = residual_stream(model, batch["input_ids"], batch["attention_mask"], layers)
        for l in layers:
            out[l].append(acts[l][:, -1].float().numpy())
    return {l: np.concatenate(v) for l, v in out.items()}

def probe(X, y):
    clf = LogisticRegression(max_iter=2000, C=0.1)
    return cross_val_score(clf, (X - X.mean(0)) / (X.std(0) + 1e-6), y, cv=5).mean()

for name, adapter in [("no ablation", None), *[(a, a) for a in sys.argv[1:]]]:
    handle = ConceptAblation.from_pretrained(model, adapter) if adapter else None
    feats = features()
    for l, X in feats.items():
        print(f"{name} | layer {l}: sentiment value {probe(X, value):.3f}, unintended letter {probe(X, letter):.3f}, "
              f"intended letter {probe(X, intended):.3f}")
    if handle is not None:
        handle.remove()
