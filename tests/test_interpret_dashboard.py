"""The dashboard: a self-contained page that shows latents and highlighted contexts, and exports a config.

Browser tests render the page in headless Chromium (Debian packages ``chromium`` and
``chromium-driver``); they skip only when the Chromium binary is absent.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess

import pytest
from conftest import make_sae, make_tiny_model, make_tiny_tokenizer

from hf_concept_ablation.adapter.config import ConceptAblationConfig, SAESource
from hf_concept_ablation.search.attribution import LatentEffect
from hf_concept_ablation.search.cache import build_activation_cache
from hf_concept_ablation.search.dashboard import (
    config_from_selection,
    neuronpedia_url,
    render_dashboard,
    save_selection_config,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
#: CI sets HF_CONCEPT_ABLATION_BROWSER_TESTS=required, so a missing browser fails there instead of skipping
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("HF_CONCEPT_ABLATION_BROWSER_TESTS") != "required",
    reason="headless Chromium is not installed (apt-get install chromium chromium-driver)",
)
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PUBLIC = SAESource(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_1/width_16k/canonical")
LOCAL = SAESource(path="/somewhere/layer_3")
ROWS = [LatentEffect(1, 5, 0.8), LatentEffect(3, 17, -0.6), LatentEffect(1, 9, 0.4), LatentEffect(3, 2, 0.1)]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    model, tokenizer = make_tiny_model("gemma3"), make_tiny_tokenizer()
    saes = {1: make_sae("jumprelu", layer=1, seed=1), 3: make_sae("jumprelu", layer=3, seed=3)}
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(6, 128)}" for _ in range(rng.randrange(3, 20))) for _ in range(30)]
    cache = build_activation_cache(model, tokenizer, texts, saes, [(r.layer, r.latent) for r in ROWS], top_k=3,
                                   progress=False)
    path = render_dashboard(
        ROWS, tmp_path_factory.mktemp("dash") / "dashboard.html", cache=cache,
        explanations={(1, 5): "fires on <odd> words & symbols"}, contrast={(1, 5): 2.5, (3, 17): -0.3},
        sae_sources={1: PUBLIC, 3: LOCAL}, base_model_name_or_path="tiny/model",
    )
    return path, cache


def _expected(selection):
    return config_from_selection(selection, {1: PUBLIC, 3: LOCAL}, base_model_name_or_path="tiny/model").to_dict()


def _same_config(exported: dict, selection) -> None:
    expected = _expected(selection)
    assert set(exported) == set(expected)
    exported = ConceptAblationConfig.from_dict(exported).to_dict()
    for key in expected:
        if key != "description":
            assert exported[key] == expected[key], key
    prefix = "chosen in the dashboard: "
    assert exported["description"].startswith(prefix)  # then the latents in the order they were ticked
    assert set(exported["description"][len(prefix):].split(", ")) == {f"layer {l} latent {i}" for l, i in selection}


def test_config_from_selection_has_the_config_format(tmp_path):
    config = save_selection_config([(3, 17), (1, 9), (1, 5), (1, 5)], tmp_path / "c.json", saes={1: PUBLIC, 3: LOCAL})
    assert config.layers == [1, 3] and config.latents == {1: [5, 9], 3: [17]}
    assert config.saes == {1: PUBLIC, 3: LOCAL}
    again = ConceptAblationConfig.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert again.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="no latents"):
        config_from_selection([])


def test_neuronpedia_links_only_for_known_public_releases():
    assert neuronpedia_url(PUBLIC, 42) == "https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k/42"
    assert neuronpedia_url(LOCAL, 42) is None
    assert neuronpedia_url(SAESource(release="no-such-release", sae_id="x"), 1) is None


def test_page_is_one_self_contained_file(page):
    path, _ = page
    text = path.read_text()
    assert "<link" not in text and "src=" not in text and "@import" not in text and "fetch(" not in text
    urls = re.findall(r"https?://[^\s\"'<]+", text)
    assert urls and all(u.startswith("https://www.neuronpedia.org/gemma-2-2b/1-gemmascope-res-16k/") for u in urls)
    assert text.count('class="latent"') == len(ROWS)
    assert "&lt;odd&gt; words &amp; symbols" in text  # explanations are escaped


@needs_chromium
def test_chromium_runs_the_page_script_and_exports_the_chosen_latents(page):
    path, _ = page
    url = f"file://{path}#select=1:5,3:17&export"
    dom = subprocess.run([CHROMIUM, *CHROME_FLAGS, "--virtual-time-budget=3000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom, "the page script did not run"
    assert dom.count('class="latent picked"') == 2
    assert "2 selected" in dom
    exported = json.loads(re.search(r'<pre id="export-json">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    _same_config(exported, [(1, 5), (3, 17)])


@needs_chromium
def test_clicking_checkboxes_and_export_in_a_real_browser(page, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    path, cache = page
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, "--window-size=1200,1000"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER) if CHROMEDRIVER else Service(), options=options)
    try:
        driver.get(f"file://{path}")
        cards = driver.find_elements(By.CSS_SELECTOR, ".latent")
        assert [c.get_attribute("id") for c in cards] == [f"latent-{r.layer}-{r.latent}" for r in ROWS]
        first = cards[0]
        assert "attribution +0.8" in first.text and "contrast d = +2.5" in first.text
        assert "fires on <odd> words & symbols" in first.text
        assert first.find_element(By.CSS_SELECTOR, "a.np").get_attribute("href").endswith("/1-gemmascope-res-16k/5")
        assert not cards[1].find_elements(By.CSS_SELECTOR, "a.np")  # local SAE: no link
        # highlighted contexts: the max token of the top context is fully coloured, zero tokens are not
        contexts = first.find_elements(By.CSS_SELECTOR, ":scope > .ctx")
        assert len(contexts) == len(cache.examples(1, 5, "top"))
        center = contexts[0].find_element(By.CSS_SELECTOR, ".tok.center")
        assert center.value_of_css_property("background-color") == "rgba(255, 120, 0, 1)"
        plain = [t for t in contexts[0].find_elements(By.CSS_SELECTOR, ".tok") if t.get_attribute("data-act") == "0"]
        assert all(t.value_of_css_property("background-color") == "rgba(0, 0, 0, 0)" for t in plain)

        driver.find_element(By.ID, "export").click()
        assert "Tick at least one latent" in driver.find_element(By.ID, "export-msg").text
        for layer, latent in [(3, 17), (1, 9)]:
            driver.find_element(By.CSS_SELECTOR, f'input.pick[data-layer="{layer}"][data-latent="{latent}"]').click()
        assert driver.find_element(By.ID, "count").text == "2 selected"
        driver.find_element(By.ID, "export").click()
        exported = json.loads(driver.find_element(By.ID, "export-json").text)
        _same_config(exported, [(1, 9), (3, 17)])
        link = driver.find_element(By.ID, "download")
        assert link.get_attribute("href").startswith("blob:") and link.get_attribute("download") == "concept_ablation_config.json"
        assert driver.save_screenshot(str(tmp_path / "dashboard.png"))
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        driver.find_element(By.ID, "clear").click()
        assert driver.find_element(By.ID, "count").text == "0 selected"
    finally:
        driver.quit()
