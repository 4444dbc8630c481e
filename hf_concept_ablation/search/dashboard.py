"""A single-file HTML dashboard for choosing latents by hand, and the config it exports.

`render_dashboard` writes one self-contained HTML file (inline CSS and JS, nothing
fetched from the network) listing the top latents of an attribution table, each with
its attribution effect, contrast score and explanation when known, activation
statistics, its highlighted contexts (each token's background intensity is its
activation relative to the latent's maximum; hover shows the value) and a link to its
Neuronpedia page when the SAE is a public release that sae-lens's registry maps to a
Neuronpedia id. Checkboxes choose latents; "Export config" shows and offers for
download a ``ConceptAblationConfig`` JSON in the same format as
``ConceptAblationConfig.to_dict()``, loadable with ``ConceptAblationConfig.from_dict``.

The page can be driven from its URL: ``dashboard.html#select=3:17,6:5&export``
ticks those latents and exports, which is how the browser tests read it.

`config_from_selection` / `save_selection_config` do the same export from Python. After an erasure-driven
selection the page opens with its curve: the probe accuracy at each probed layer against the number of latents
ablated, with the target (chance + tolerance) and the count that reached it.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..adapter.config import ConceptAblationConfig, SAESource
from ..files import write_text_atomic
from .attribution import LatentEffect
from .cache import ActivationCache, ContextExample

if TYPE_CHECKING:
    from .erasure import ErasureCurve

NEURONPEDIA_URL = "https://www.neuronpedia.org"


# ---------------------------------------------------------------------------------------------- config export


def config_from_selection(
    selection: Iterable[tuple[int, int]],
    saes: Mapping[int, SAESource] | None = None,
    *,
    mode: str = "latent",
    alpha: float = 1.0,
    base_model_name_or_path: str | None = None,
    description: str = "",
    check_model_name: bool = True,
) -> ConceptAblationConfig:
    """A `ConceptAblationConfig` ablating the chosen (layer, latent) pairs.

    `saes` (layer -> `SAESource`) is recorded for the layers used, so the config can be
    injected without passing SAEs; layers without a source need ``saes=`` at injection.
    """
    latents: dict[int, list[int]] = {}
    for layer, latent in selection:
        ids = latents.setdefault(int(layer), [])
        if int(latent) not in ids:
            ids.append(int(latent))
    if not latents:
        raise ValueError("no latents chosen")
    saes = saes or {}
    return ConceptAblationConfig(
        layers=sorted(latents),
        mode=mode,  # type: ignore[arg-type]
        latents={layer: sorted(ids) for layer, ids in sorted(latents.items())},
        saes={layer: saes[layer] for layer in latents if layer in saes},
        alpha=alpha,
        base_model_name_or_path=base_model_name_or_path,
        description=description,
        check_model_name=check_model_name,
    )


def save_selection_config(
    selection: Iterable[tuple[int, int]], path: str | os.PathLike, **kwargs: Any
) -> ConceptAblationConfig:
    """Build the config with `config_from_selection` and write it as JSON (atomically); returns it."""
    config = config_from_selection(selection, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config.to_json_file(path)
    return config


# ---------------------------------------------------------------------------------------------- neuronpedia


@functools.lru_cache(maxsize=1)
def _registry() -> dict[str, Any]:
    try:
        from sae_lens.loading.pretrained_saes_directory import (
            get_pretrained_saes_directory,
        )

        return get_pretrained_saes_directory()
    except Exception:  # noqa: BLE001 - an unreadable registry only costs the links
        return {}


def neuronpedia_id(source: SAESource | None) -> str | None:
    """Neuronpedia's id (``"<model>/<sae set>"``) of a public sae-lens release, if the registry has one."""
    if source is None or source.release is None:
        return None
    lookup = _registry().get(source.release)
    if lookup is None:
        return None
    return (getattr(lookup, "neuronpedia_id", None) or {}).get(source.sae_id)


def neuronpedia_url(source: SAESource | None, latent: int) -> str | None:
    """Link to a latent's Neuronpedia page, or None if the SAE is not a known public release."""
    np_id = neuronpedia_id(source)
    return f"{NEURONPEDIA_URL}/{np_id}/{int(latent)}" if np_id else None


# ---------------------------------------------------------------------------------------------- rendering


def _token_html(token: str, act: float, top: float, is_center: bool) -> str:
    level = 0.0 if top <= 0 else max(0.0, min(1.0, act / top))
    shown = token.replace("\n", "\u21b5").replace("\t", "\u2192") or "\u2205"
    style = f"background: rgba(255, 120, 0, {level:.3f})" if level > 0 else ""
    cls = "tok center" if is_center else "tok"
    return (f'<span class="{cls}" style="{style}" data-act="{act:.4g}" title="{html.escape(repr(token))}: '
            f'{act:.4g}">{html.escape(shown)}</span>')


def _context_html(example: ContextExample, top: float) -> str:
    tokens = "".join(_token_html(t, a, top, i == example.center) for i, (t, a) in enumerate(zip(example.tokens, example.acts)))
    return f'<div class="ctx" data-kind="{example.kind}"><span class="val">{example.value:.3g}</span>{tokens}</div>'


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _explanation_text(value: Any) -> tuple[str, str]:
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, ""
    text = getattr(value, "explanation", str(value))
    scores = []
    for name, label in (("simulation_score", "sim"), ("relevance", "rel"), ("similarity", "emb")):
        score = getattr(value, name, None)
        if isinstance(score, float) and score == score:
            scores.append(f"{label} {score:.2f}")
    return text, ", ".join(scores)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
header{background:#1d2430;color:#fff;padding:14px 22px;position:sticky;top:0;z-index:2}
header h1{font-size:18px;margin:0 0 4px}header .meta{font-size:12px;opacity:.8}
.bar{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin-top:8px;font-size:13px}
.bar button{background:#ff7800;color:#fff;border:0;border-radius:4px;padding:6px 12px;cursor:pointer;font-weight:600}
.bar button.secondary{background:#4a5568}.bar select,.bar input{padding:3px;border-radius:3px;border:0}
main{padding:16px 22px}
.latent{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin-bottom:12px;padding:10px 14px}
.latent.picked{border-color:#ff7800;box-shadow:0 0 0 2px #ffd2a8}
.head{display:flex;gap:14px;align-items:baseline;flex-wrap:wrap}
.head label{font-weight:700;font-size:15px;cursor:pointer}
.num{font-variant-numeric:tabular-nums;font-size:13px;color:#4a5568}.pos{color:#0a7d32}.neg{color:#b42318}
.expl{margin:6px 0;font-style:italic}.expl .scores{font-style:normal;color:#718096;font-size:12px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;line-height:1.7;
 border-top:1px dashed #edf0f3;padding:2px 0}
.ctx .val{display:inline-block;min-width:44px;color:#718096;font-size:11px}
.tok{border-radius:2px}.tok.center{outline:1px solid #c05600}
details summary{cursor:pointer;font-size:12px;color:#4a5568;margin-top:4px}
#export-panel{display:none;background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:10px 14px;margin-bottom:14px}
#export-json{font-size:12px;background:#f1f3f5;padding:8px;overflow:auto;max-height:260px}
.none{color:#a0aec0;font-size:12px}
"""

_JS = r"""
const DATA = JSON.parse(document.getElementById('dashboard-data').textContent);
function picks(){return Array.from(document.querySelectorAll('input.pick:checked'))
  .map(cb=>[parseInt(cb.dataset.layer),parseInt(cb.dataset.latent)]);}
function refresh(){
  document.querySelectorAll('input.pick').forEach(cb=>cb.closest('.latent').classList.toggle('picked',cb.checked));
  document.getElementById('count').textContent=picks().length+' selected';}
function sortKeys(v){if(Array.isArray(v))return v.map(sortKeys);
  if(v&&typeof v==='object'){const o={};Object.keys(v).sort().forEach(k=>o[k]=sortKeys(v[k]));return o;}return v;}
function buildConfig(){
  const sel=picks(); if(!sel.length) return null;
  const latents={}; sel.forEach(([l,i])=>{(latents[l]=latents[l]||[]); if(!latents[l].includes(i)) latents[l].push(i);});
  const layers=Object.keys(latents).map(Number).sort((a,b)=>a-b);
  const cfg=JSON.parse(JSON.stringify(DATA.config_template));
  cfg.layers=layers; cfg.latents={}; cfg.saes={};
  layers.forEach(l=>{cfg.latents[String(l)]=latents[l].sort((a,b)=>a-b);
    if(DATA.saes[String(l)]) cfg.saes[String(l)]=DATA.saes[String(l)];});
  cfg.mode=document.getElementById('mode').value;
  cfg.alpha=parseFloat(document.getElementById('alpha').value);
  cfg.description='chosen in the dashboard: '+sel.map(([l,i])=>'layer '+l+' latent '+i).join(', ');
  return sortKeys(cfg);}
function exportConfig(){
  const cfg=buildConfig(); const panel=document.getElementById('export-panel'); const pre=document.getElementById('export-json');
  panel.style.display='block';
  if(!cfg){pre.textContent='';document.getElementById('export-msg').textContent='Tick at least one latent first.';return null;}
  const text=JSON.stringify(cfg,null,2)+'\n'; pre.textContent=text;
  document.getElementById('export-msg').textContent=cfg.layers.length+' layer(s), '+
    Object.values(cfg.latents).reduce((n,v)=>n+v.length,0)+' latent(s). Save as concept_ablation_config.json.';
  const link=document.getElementById('download'); if(link.href.startsWith('blob:')) URL.revokeObjectURL(link.href);
  link.href=URL.createObjectURL(new Blob([text],{type:'application/json'})); link.style.display='inline';
  return text;}
function copyConfig(){const text=exportConfig(); if(!text) return;
  if(navigator.clipboard&&navigator.clipboard.writeText){navigator.clipboard.writeText(text).catch(()=>{});}}
function setAll(on){document.querySelectorAll('input.pick').forEach(cb=>{cb.checked=on;}); refresh();}
document.querySelectorAll('input.pick').forEach(cb=>cb.addEventListener('change',refresh));
document.getElementById('export').addEventListener('click',exportConfig);
document.getElementById('copy').addEventListener('click',copyConfig);
document.getElementById('clear').addEventListener('click',()=>setAll(false));
function fromHash(){const h=decodeURIComponent(location.hash.slice(1)); if(!h) return;
  const parts=h.split('&'); let doExport=false;
  parts.forEach(p=>{if(p==='export') doExport=true;
    if(p.startsWith('select=')) p.slice(7).split(',').filter(Boolean).forEach(s=>{const [l,i]=s.split(':');
      const cb=document.querySelector('input.pick[data-layer="'+parseInt(l)+'"][data-latent="'+parseInt(i)+'"]');
      if(cb&&!cb.checked) cb.click();});});
  if(doExport) document.getElementById('export').click();}
refresh(); fromHash(); document.body.dataset.ready='1';
"""


def _as_mapping(values: Any, attr: str) -> dict[tuple[int, int], Any]:
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return {(int(k[0]), int(k[1])): v for k, v in values.items()}
    return {(int(v.layer), int(v.latent)): (getattr(v, attr) if attr else v) for v in values}


_CURVE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def erasure_curve_svg(curve: ErasureCurve, width: int = 560, height: int = 260) -> str:
    """An inline SVG figure of `curve`: probe accuracy per probed layer (one line each) against the latents ablated
    (log-spaced x: 0, 1, 2, 4, ...), the target as a dashed line, and a caption saying where erasure was reached."""
    left, right, top, bottom = 48, 110, 16, 36
    xs = [0.0 if count == 0 else 1 + math.log2(count) for count in curve.counts]
    span = max(xs) or 1.0

    def x(value: float) -> float:
        return left + (width - left - right) * value / span

    def y(accuracy: float) -> float:  # 0.4 .. 1.0 on the axis
        return top + (height - top - bottom) * (1.0 - min(max(accuracy, 0.4), 1.0)) / 0.6

    parts = [f'<figure class="curve"><svg width="{width}" height="{height}" role="img" '
             'aria-label="probe accuracy against latents ablated" style="background:#fff;border:1px solid #dde">']
    for tick in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.1f}</text>'
                     f'<line x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>')
    for value, count in zip(xs, curve.counts):
        parts.append(f'<text x="{x(value):.1f}" y="{height - bottom + 14}" font-size="11" '
                     f'text-anchor="middle">{count}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(curve.target):.1f}" y2="{y(curve.target):.1f}" '
                 f'stroke="#333" stroke-dasharray="5,4"/><text x="{width - right + 4}" y="{y(curve.target) + 4:.1f}" '
                 f'font-size="11">target {curve.target:.2f}</text>')
    layers = sorted({layer for point in curve.accuracy for layer in point}, key=lambda k: int(k))
    for i, layer in enumerate(layers):
        color = _CURVE_COLORS[i % len(_CURVE_COLORS)]
        points = " ".join(f"{x(v):.1f},{y(point[layer]):.1f}" for v, point in zip(xs, curve.accuracy)
                          if layer in point)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>'
                     f'<text x="{width - right + 4}" y="{top + 14 * (i + 2)}" font-size="11" fill="{color}">'
                     f'layer {layer}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle">'
                 'latents ablated (search ranking order)</text></svg>')
    parts.append(f"<figcaption>{html.escape(curve.describe())}</figcaption></figure>")
    return "".join(parts)


def render_dashboard(
    attribution: Sequence[LatentEffect],
    path: str | os.PathLike,
    *,
    cache: ActivationCache | None = None,
    explanations: Any = None,
    contrast: Any = None,
    sae_sources: Mapping[int, SAESource] | None = None,
    preselected: Iterable[tuple[int, int]] = (),
    base_model_name_or_path: str | None = None,
    title: str = "Concept ablation: choose latents",
    max_latents: int = 100,
    n_contexts: int = 6,
    erasure_curve: ErasureCurve | None = None,
) -> Path:
    """Write the dashboard HTML for the top `max_latents` rows of `attribution`; returns its path.

    Args:
        cache: contexts and statistics of the latents (latents not in it show none).
        explanations: ``{(layer, latent): str}`` or a list of `LatentExplanation`.
        contrast: ``{(layer, latent): d}`` or a list of `ContrastScore`.
        sae_sources: layer -> `SAESource`, recorded in the exported config and used for
            Neuronpedia links.
        preselected: latents ticked when the page opens (e.g. the automatic choice).
        n_contexts: top contexts shown per latent (quantile samples go in a fold).
        erasure_curve: the erasure-driven selection's curve, drawn above the latents.
    """
    sae_sources = dict(sae_sources or {})
    explanation_map = _as_mapping(explanations, "")
    contrast_map = _as_mapping(contrast, "score")
    preselected = {(int(a), int(b)) for a, b in preselected}
    rows = sorted(attribution, key=lambda r: abs(r.effect), reverse=True)[:max_latents]
    cards = []
    for rank, row in enumerate(rows, 1):
        key = (row.layer, row.latent)
        text, scores = _explanation_text(explanation_map.get(key))
        c = contrast_map.get(key)
        stats = cache.stats(*key) if cache is not None and key in cache else None
        link = neuronpedia_url(sae_sources.get(row.layer), row.latent)
        parts = [
            f'<div class="latent" id="latent-{row.layer}-{row.latent}" data-layer="{row.layer}" data-latent="{row.latent}">',
            '<div class="head">',
            f'<label><input type="checkbox" class="pick" data-layer="{row.layer}" data-latent="{row.latent}"'
            f'{" checked" if key in preselected else ""}> #{rank} &nbsp;L{row.layer} / {row.latent}</label>',
            f'<span class="num effect {"pos" if row.effect >= 0 else "neg"}">attribution {row.effect:+.4g}</span>',
        ]
        if c is not None:
            parts.append(f'<span class="num contrast">contrast d = {c:+.3g}</span>')
        if stats is not None:
            pct = 100 * stats["frequency"]
            parts.append(f'<span class="num">max {_fmt(stats["max_activation"])}, fires on '
                         f'{pct:.1f}% of tokens</span>' if pct >= 1 else
                         f'<span class="num">max {_fmt(stats["max_activation"])}, fires on '
                         f'{pct:.2g}% of tokens</span>')
        if link:
            parts.append(f'<a class="np" href="{html.escape(link)}" target="_blank" rel="noopener">Neuronpedia</a>')
        parts.append("</div>")
        if text:
            parts.append(f'<div class="expl">{html.escape(text)}'
                         f'{f" <span class=scores>({html.escape(scores)})</span>" if scores else ""}</div>')
        examples = cache.examples(*key, "top") if stats is not None else []
        if examples:
            top = stats["max_activation"] or max(e.value for e in examples)
            parts += [_context_html(e, top) for e in examples[:n_contexts]]
            quantiles = cache.examples(*key, "quantiles")
            if quantiles:
                parts.append(f"<details><summary>{len(quantiles)} samples across activation quantiles</summary>")
                parts += [_context_html(e, top) for e in quantiles]
                parts.append("</details>")
        else:
            parts.append('<div class="none">no cached contexts</div>')
        parts.append("</div>")
        cards.append("".join(parts))
    template = ConceptAblationConfig(layers=[0], latents={0: [0]}, base_model_name_or_path=base_model_name_or_path).to_dict()
    data = {
        "config_template": template,
        "saes": {str(layer): dataclasses.asdict(src) for layer, src in sae_sources.items()},
        "latents": [[r.layer, r.latent, r.effect] for r in rows],
    }
    data_json = json.dumps(data).replace("</", "<\\/")
    layers = sorted({r.layer for r in rows})
    meta = (f"{len(rows)} latents by |attribution| over layers {layers}"
            + (f" &middot; base model {html.escape(base_model_name_or_path)}" if base_model_name_or_path else "")
            + (f" &middot; contexts from {cache.info.get('n_texts')} texts" if cache is not None else ""))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<header><h1>{html.escape(title)}</h1><div class="meta">{meta}</div>
<div class="bar"><span id="count">0 selected</span>
<label>mode <select id="mode"><option value="latent">latent</option><option value="projection">projection</option></select></label>
<label>alpha <input id="alpha" type="number" min="0" max="1" step="0.05" value="1" style="width:60px"></label>
<button id="export">Export config</button><button id="copy" class="secondary">Copy JSON</button>
<button id="clear" class="secondary">Clear</button>
<a id="download" download="concept_ablation_config.json" style="display:none;color:#ffb070">download concept_ablation_config.json</a>
</div></header>
<main>
<div id="export-panel"><div id="export-msg"></div><pre id="export-json"></pre></div>
{erasure_curve_svg(erasure_curve) if erasure_curve is not None else ""}
{"".join(cards) if cards else '<p class="none">the attribution table is empty</p>'}
</main>
<script type="application/json" id="dashboard-data">{data_json}</script>
<script>{_JS}</script>
</body></html>
"""
    return write_text_atomic(path, page)
