"""SAEs for a model without public ones: a text corpus, an activation store, training with sae-lens, and quality
(explained variance, CE loss recovered). The shipped suite for the embedded model lives in ``assets/saes``; loading
any SAE source is the adapter's (`hf_concept_ablation.adapter.sae_sources`)."""
