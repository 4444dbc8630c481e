"""Shared fixtures: tiny random models of each supported family, and real sae-lens SAEs."""

from __future__ import annotations

import concurrent.futures
import fnmatch
import shutil
import socket
from pathlib import Path
from typing import Sequence

import pytest
import torch
import yaml
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

HIDDEN = 64
NUM_LAYERS = 4
VOCAB = 128


def _common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        bos_token_id=2,
        pad_token_id=0,
        eos_token_id=1,
    )


def make_tiny_model(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny randomly initialised causal LM of the given family, in eval mode."""
    torch.manual_seed(0)
    if family == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**_common()))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**_common(), sliding_window=16))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common()))
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=NUM_LAYERS, n_head=4, n_positions=128,
            bos_token_id=2, eos_token_id=1, pad_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def make_sae(architecture: str, d_in: int = HIDDEN, d_sae: int = 256, seed: int = 0, layer: int | None = None):
    """A real sae-lens SAE with random weights such that a good share of latents fire."""
    gen = torch.Generator().manual_seed(seed)
    metadata_kwargs = {"hook_name": f"blocks.{layer}.hook_resid_post"} if layer is not None else {}
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(**metadata_kwargs)
    if architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    elif architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    elif architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=64, metadata=metadata))
    else:
        raise ValueError(architecture)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) / d_sae**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.5)
    return sae.eval()


@pytest.fixture(autouse=True)
def _torch_threads(request):
    """Tiny models run fastest on one thread (and are not slowed by a busy machine); the real model uses all."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["gemma2", "gemma3", "llama", "gpt2"])
def family(request) -> str:
    return request.param


def make_tiny_tokenizer(words: Sequence[str] = ()):
    """An offline word-level tokenizer matching the tiny models: PAD=0, EOS=1, BOS=2, words 'A', 'B', 'w6'..'w127';
    `words` (e.g. `gender_concept_words`) take the first ids of the 'w' words, which are then unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[BOS]": 2, "[UNK]": 3, "A": 4, "B": 5}
    vocab.update({word: 6 + i for i, word in enumerate(words)})
    vocab.update({f"w{i}": i for i in range(6 + len(words), VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


def gender_concept_words() -> list[str]:
    """The words in which the gender task's paired concept texts differ ('She is my mother.' / 'He is my father.'),
    for a tiny tokenizer that tells the two sets apart (with none of them known, every pair reads the same)."""
    from hf_concept_ablation.search.pipeline import task_data

    task = task_data("gender_bias")
    return sorted({w for a, b in zip(task.concept_a, task.concept_b) for w in set(a.split()) ^ set(b.split())})


def make_tiny_mc_dataset(n: int = 12, seed: int = 0):
    """Multiple-choice rows of random words for the tiny models, answers ' A' / ' B'."""
    import random

    import datasets

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = " ".join(f"w{rng.randrange(6, VOCAB)}" for _ in range(rng.randrange(4, 9)))
        answer, distractor = (" A", " B") if i % 2 == 0 else (" B", " A")
        rows.append({"prompt": words, "answer": answer, "distractor": distractor})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """For the recipes: a tiny Gemma 3 model folder, a caft adapter from a real sae-lens SAE folder, and an attribution table."""
    from hf_concept_ablation import ConceptAblationConfig, SAESource, inject_concept_ablation
    from hf_concept_ablation.search.attribution import attribute_latents, save_attribution
    from hf_concept_ablation.tasks import build_gender_datasets

    root = tmp_path_factory.mktemp("tiny")
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    sources = {}
    saes = {}
    for layer in (1, 2):
        saes[layer] = make_sae("standard", d_sae=128, seed=layer, layer=layer)
        saes[layer].save_model(root / f"sae_{layer}")
        sources[layer] = SAESource(path=str(root / f"sae_{layer}"))
    data = build_gender_datasets()["train"].select(range(16))
    table = attribute_latents(model, tokenizer, data, saes, top=100)
    save_attribution(table, root / "attribution")
    chosen = {1: [table[0].latent if table[0].layer == 1 else 0, 5]}
    ablation = inject_concept_ablation(model, ConceptAblationConfig(layers=[1], latents=chosen, saes={1: sources[1]}))
    ablation.save_pretrained(root / "adapter")
    return root


def recipe_config(root: Path, out: Path, conditions, **experiment) -> Path:
    """A gender recipe YAML (beside `out`, which it names as output_dir) on the `tiny_setup` in `root`: one seed, one
    epoch of 16 examples, 8 evaluated per split; `experiment` adds or replaces experiment settings."""
    config = {
        "task": {"seed": 0},
        "experiment": {
            "model": str(root / "model"),
            "seeds": [0],
            "conditions": conditions,
            "preset": "paper",
            "training": {"learning_rate": 1e-3, "batch_size": 4, "epochs": 1, "warmup_ratio": 0.0},
            "adapter": str(root / "adapter"),
            "attribution": str(root / "attribution.json"),
            "saes": {layer: {"path": str(root / f"sae_{layer}")} for layer in (1, 2)},
            "train_size": 16,
            "eval_size": 8,
            "output_dir": str(out),
            **experiment,
        },
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path



def free_port() -> int:
    """A free TCP port on the loopback interface, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubAtTheBoundary:
    """`huggingface_hub.HfApi` at the network boundary (the Hub is not reachable here): an upload lands in a
    local Hub cache folder laid out as a download leaves it, so the real `hf_hub_download` reads it back.
    Each upload is a new snapshot holding the previous one's files plus the uploaded ones."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.repos, self.commits, self.branches = cache, [], [], set()

    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool, token: str | None = None):
        from huggingface_hub import RepoUrl

        self.repos.append((repo_id, private, exist_ok))
        self.branches.add((repo_id, "main"))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool = False, **_options) -> None:
        if branch.startswith("refs/"):  # the Hub's refs/pr/N belong to pull requests, never made as branches
            raise ValueError(f"invalid branch name {branch}")
        if (repo_id, branch) in self.branches and not exist_ok:
            raise ValueError(f"branch {branch} of {repo_id} exists")  # the Hub answers 409 Conflict
        self.branches.add((repo_id, branch))

    def upload_folder(self, *, repo_id: str, folder_path: str, commit_message: str, path_in_repo: str | None = None,
                      ignore_patterns: list[str] | None = None, revision: str | None = None,
                      run_as_future: bool = False, **_options):
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        branch = revision or "main"
        if (repo_id, branch) not in self.branches:  # as the Hub: a commit needs an existing branch
            from huggingface_hub.errors import RevisionNotFoundError

            raise RevisionNotFoundError(f"Invalid rev id: {branch}")
        sha = f"{len(self.commits) + 1:040x}"
        snapshot = repo / "snapshots" / sha
        head = repo / "refs" / branch
        if head.is_file():
            shutil.copytree(repo / "snapshots" / head.read_text(), snapshot)
        uploaded = []
        for file in sorted(Path(folder_path).rglob("*")):
            relative = file.relative_to(folder_path).as_posix()
            if file.is_file() and not any(fnmatch.fnmatch(relative, p) for p in ignore_patterns or []):
                target = snapshot / (path_in_repo or "") / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, target)
                uploaded.append(f"{path_in_repo}/{relative}" if path_in_repo else relative)
        snapshot.mkdir(parents=True, exist_ok=True)
        head.parent.mkdir(parents=True, exist_ok=True)
        head.write_text(sha)
        self.commits.append((repo_id, branch, commit_message, uploaded))
        url = f"https://huggingface.co/{repo_id}/commit/{sha}"
        if not run_as_future:
            return url
        done = concurrent.futures.Future()  # as HfApi's run_as_future: the upload's future, here already finished
        done.set_result(url)
        return done

    def read_back(self, monkeypatch) -> None:
        """Point the real ``hf_hub_download`` at this cache, offline."""
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(self.cache))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


class StopAt(TrainerCallback):
    """Stop training after optimizer step `step`, saving a checkpoint there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def covariance_with_label(model, texts, labels, layer, ablated=False, eraser=None) -> tuple[float, float]:
    """At `layer` of `model` over `texts` (`ablated`: its concept ablation on; `eraser`: applied to the activations):
    the largest |covariance| of a residual coordinate with the label (``female`` or not), and the largest coordinate
    std."""
    from hf_concept_ablation.search.activations import iter_residuals

    z = torch.tensor([label == "female" for label in labels], dtype=torch.float64)
    xs, zs = [], []
    for batch in iter_residuals(model, make_tiny_tokenizer(), texts, [layer], progress=False, ablated=ablated):
        x = batch.hidden[layer][batch.keep].double()
        xs.append(x if eraser is None else eraser(x))
        zs.append(z[batch.doc_ids].unsqueeze(1).expand(-1, batch.keep.shape[1])[batch.keep])
    x, zz = torch.cat(xs), torch.cat(zs)
    cov = ((x - x.mean(0)) * (zz - zz.mean())[:, None]).mean(0)
    return float(cov.abs().max()), float(x.std(0).max())
