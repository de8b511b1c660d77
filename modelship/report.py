"""The pages a person opens: `report.html` of a run or an evaluation, and `confusion_matrix.png`.

Self-contained HTML (inline CSS, inline SVG charts, the confusion matrix as a coloured table whose numbers can be
read and copied), and a PNG drawn with Pillow: no plotting library, nothing fetched when the page is opened.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from modelship.files import write_bytes
from modelship.fonts import class_labels, draw_right

CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:0 0 12px}
.sub{color:#59636e;margin-bottom:18px}
.badge{display:inline-block;padding:3px 12px;border-radius:14px;font-weight:600;font-size:13px;color:#fff;
  vertical-align:middle;margin-left:10px}
.badge.pass{background:#1a7f37}.badge.fail{background:#cf222e}.badge.warn{background:#9a6700}
.reason{background:#ffebe9;border:1px solid #ff8182;border-radius:6px;padding:10px 14px;margin:0 0 18px}
.reason.warn{background:#fff8c5;border-color:#d4a72c}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:12px;margin-bottom:18px}
.tile{background:#fff;border:1px solid #d1d9e0;border-radius:8px;padding:12px 14px}
.tile .v{font-size:22px;font-weight:600}.tile .k{color:#59636e;font-size:12px;text-transform:uppercase}
.tile .n{color:#59636e;font-size:12px}
section{background:#fff;border:1px solid #d1d9e0;border-radius:8px;padding:16px 18px;margin-bottom:16px}
.row{display:flex;flex-wrap:wrap;gap:24px}.row>div{flex:1 1 420px;min-width:0}
.row>div:last-child:nth-child(odd):not(:first-child){max-width:calc(50% - 12px)}
@media (max-width:900px){.row>div:last-child:nth-child(odd):not(:first-child){max-width:none}}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;text-align:right;border-bottom:1px solid #eaeef2;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{color:#59636e;font-weight:600}
table.cm td{text-align:center;min-width:38px;border:1px solid #fff}
table.left td,table.left th{text-align:left}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.muted{color:#59636e}code,pre{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow:auto;max-height:360px}
section h2+p{margin-top:0}section>h2:not(:first-child),section div+h2{margin-top:18px}
a{color:#0969da}details summary{cursor:pointer;color:#59636e;margin-top:8px}
"""
SERIES_COLOURS = ("#0969da", "#bf3989", "#1a7f37", "#9a6700")


def esc(value: Any) -> str:
    return html.escape(str(value))


def write(path: Path, page: str) -> None:
    """The page through a temp file and rename: a reader never sees half of it."""
    write_bytes(path, page.encode())


BADGES = {"PASS": "pass", "FAIL": "fail", "OK": "pass", "WARN": "warn", "DRIFT": "fail"}  # a badge's colour


def page(title: str, subtitle: str, badge: str | None, reason: str, body: str) -> str:
    """The page; `badge` one of BADGES (a run's PASS or FAIL, a monitor's status) or None; `reason` in a box under the
    title, amber beside a WARN badge, red otherwise."""
    tone = BADGES[badge] if badge else "fail"
    mark = f'<span class="badge {tone}">{badge}</span>' if badge else ""
    why = f'<div class="reason {tone}">{esc(reason)}</div>' if reason else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
        f'<body><main><h1>{esc(title)}{mark}</h1><div class="sub">{esc(subtitle)}</div>{why}{body}</main>'
        "</body></html>\n"
    )


def tiles(items: list[tuple[str, str, str]]) -> str:
    """(label, value, note) as a row of number tiles."""
    cells = "".join(
        f'<div class="tile"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>'
        f'<div class="n">{esc(n)}</div></div>'
        for k, v, n in items
    )
    return f'<div class="tiles">{cells}</div>'


def table(head: list[str], rows: list[list[Any]], css: str = "") -> str:
    """An HTML table; cells that are (text, class) tuples get the class (ok/bad/muted)."""

    def cell(tag: str, v: Any) -> str:
        if isinstance(v, tuple):
            return f'<{tag} class="{v[1]}">{v[0]}</{tag}>'
        return f"<{tag}>{esc(v)}</{tag}>"

    top = "".join(cell("th", h) for h in head)
    body = "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in rows)
    return f'<table class="{css}"><thead><tr>{top}</tr></thead><tbody>{body}</tbody></table>'


def signed(x: float) -> str:
    """+0.0123 / -0.0123 / ±0.0000: a delta without the minus sign of a negative zero."""
    return "±0.0000" if round(x, 4) == 0 else f"{x:+.4f}"


def verdict(ok: bool) -> tuple[str, str]:
    return ("PASS", "ok") if ok else ("FAIL", "bad")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    import math

    raw = (hi - lo) / max(count - 1, 1) or 1.0
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil((hi - first) / step) + 1)]


def svg_text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="11" text-anchor="{anchor}" fill="#59636e" {extra}>{esc(text)}</text>'
    )


def line_chart(title: str, x: list[float], series: dict[str, list[float]], y_label: str, x_label: str = "epoch") -> str:
    """An inline SVG line chart with axes, ticks and a legend."""
    w, h, left, right, top, bottom = 480, 260, 52, 14, 30, 38
    ys = [v for vals in series.values() for v in vals]
    ticks = nice_ticks(min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1)
    lo, hi = ticks[0], ticks[-1]
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def py(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (h - top - bottom)

    parts = [f'<text x="{left}" y="18" font-size="13" font-weight="600">{esc(title)}</text>']
    for v in ticks:
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eaeef2"/>')
        parts.append(svg_text(left - 6, py(v) + 4, f"{v:g}", "end"))
    step = max(1, round(len(x) / 8))
    parts += [svg_text(px(v), h - bottom + 16, f"{v:g}") for v in x[::step]]
    parts.append(svg_text((left + w - right) / 2, h - 4, x_label))
    middle = (top + h - bottom) / 2
    parts.append(svg_text(0, 0, y_label, extra=f'transform="translate(12,{middle:.1f}) rotate(-90)"'))
    for i, (name, vals) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        points = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, vals, strict=True))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        parts += [
            f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.5" fill="{colour}"/>' for a, b in zip(x, vals, strict=True)
        ]
        lx = w - right - 150 + 75 * (i % 2)
        parts.append(f'<rect x="{lx}" y="{8 + 14 * (i // 2)}" width="10" height="3" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="{13 + 14 * (i // 2)}" font-size="11">{esc(name)}</text>')
    return f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{esc(title)}">{"".join(parts)}</svg>'


def bar_chart(title: str, labels: list[str], series: dict[str, list[float]], y_label: str) -> str:
    """An inline SVG chart of grouped bars, one group per label, one bar per series, with a legend."""
    w, h, left, right, top, bottom = 480, 260, 52, 14, 30, 44
    ticks = nice_ticks(0.0, max([v for vals in series.values() for v in vals] + [1e-9]))
    hi = ticks[-1]
    group = (w - left - right) / max(1, len(labels))
    bar = group * 0.8 / max(1, len(series))
    parts = [f'<text x="{left}" y="18" font-size="13" font-weight="600">{esc(title)}</text>']
    for v in ticks:
        y = top + (hi - v) / hi * (h - top - bottom)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>')
        parts.append(svg_text(left - 6, y + 4, f"{v:g}", "end"))
    for i, (name, vals) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        for j, v in enumerate(vals):
            x, bh = left + j * group + group * 0.1 + i * bar, v / hi * (h - top - bottom)
            parts.append(
                f'<rect x="{x:.1f}" y="{h - bottom - bh:.1f}" width="{bar:.1f}" height="{bh:.1f}" fill="{colour}"/>'
            )
        parts.append(f'<rect x="{w - right - 150 + 75 * i}" y="8" width="10" height="3" fill="{colour}"/>')
        parts.append(f'<text x="{w - right - 136 + 75 * i}" y="13" font-size="11">{esc(name)}</text>')
    step = max(1, round(len(labels) / 12))
    parts += [svg_text(left + (j + 0.5) * group, h - bottom + 14, labels[j][:12]) for j in range(0, len(labels), step)]
    middle = (top + h - bottom) / 2
    parts.append(svg_text(0, 0, y_label, extra=f'transform="translate(12,{middle:.1f}) rotate(-90)"'))
    return f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{esc(title)}">{"".join(parts)}</svg>'


def heat(count: int, row_total: int, diagonal: bool) -> str:
    """Cell colour: the share of its row, green on the diagonal, red off it."""
    share = count / row_total if row_total else 0.0
    if count == 0:
        return "background:#fff;color:#8c959f"
    r, g, b = (26, 127, 55) if diagonal else (207, 34, 46)
    alpha = 0.12 + 0.78 * share
    text = "#fff" if alpha > 0.55 else "#1f2328"
    return f"background:rgba({r},{g},{b},{alpha:.2f});color:{text}"


def confusion_table(matrix: list[list[int]], classes: list[str]) -> str:
    """Rows = true class, columns = predicted class; colour by share of the row."""
    head = "".join(f"<th>{esc(c)}</th>" for c in classes)
    rows = []
    for i, (name, row) in enumerate(zip(classes, matrix, strict=True)):
        total = sum(row)
        cells = "".join(f'<td style="{heat(v, total, i == j)}">{v}</td>' for j, v in enumerate(row))
        rows.append(f"<tr><th>{esc(name)}</th>{cells}<td class='muted'>{total}</td></tr>")
    return (
        '<table class="cm"><thead><tr><th class="muted">true \\ predicted</th>'
        f'{head}<th class="muted">n</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def per_class_table(per_class: dict[str, dict[str, Any]]) -> str:
    rows = [
        [c, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]] for c, m in per_class.items()
    ]
    return table(["class", "precision", "recall", "f1", "support"], rows)


def evaluation_section(ev: dict[str, Any], png: str, title: str) -> str:
    """The confusion matrix, the per-class table, and the comparison of backends when there are several."""
    blocks = [ev, *ev.get("comparisons", [])]
    compare = ""
    if len(blocks) > 1:
        rows = [[b["backend"], f"{b['accuracy']:.4f}", signed(b.get("accuracy_delta", 0.0)), f"{b['ece']:.4f}",
                 f"{b['images_per_s']:.0f}"] for b in blocks]  # fmt: skip
        compare = "<h2>Backends</h2>" + table(["backend", "accuracy", "Δ vs first", "ECE", "images/s"], rows)
    note = (
        f"{ev['n']} images, accuracy <b>{ev['accuracy']:.4f}</b>, expected calibration error {ev['ece']:.4f}, "
        f"{esc(ev['backend'])} at {ev['images_per_s']:.0f} images/s. "
        f'<a href="{esc(png)}">confusion_matrix.png</a>, <a href="evaluation.json">evaluation.json</a>'
    )
    return (
        f'<section><h2>{esc(title)}</h2><p class="muted">{note}</p><div class="row">'
        f"<div>{confusion_table(ev['confusion_matrix'], ev['classes'])}</div>"
        f"<div>{per_class_table(ev['per_class'])}</div></div>{compare}</section>"
    )


def evaluation_page(manifest: dict[str, Any], ev: dict[str, Any], bundle: Path) -> str:
    """report.html of `modelship evaluate`."""
    body = tiles([
        ("accuracy", f"{ev['accuracy']:.4f}", f"{ev['backend']}, {ev['n']} images"),
        ("calibration error", f"{ev['ece']:.4f}", "expected, 15 bins"),
        ("speed", f"{ev['images_per_s']:.0f}/s", "images through the model"),
    ])  # fmt: skip
    body += evaluation_section(ev, "confusion_matrix.png", f"Confusion matrix and per-class metrics: {ev['data']}")
    return page(f"modelship evaluate: {manifest['name']}", f"bundle {bundle}, data {ev['data']}", None, "", body)


def confusion_png(matrix: list[list[int]], classes: list[str], path: Path) -> list[str]:
    """The confusion matrix as a picture: counts in cells coloured by share of their row, labelled axes. Returns
    the labels drawn (a class name no font here can draw is labelled by its index)."""
    k = len(classes)
    cell = max(44, min(90, 720 // max(k, 1)))
    font = ImageFont.load_default(size=14)
    labels = class_labels(classes, 12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(measure.textlength(text, font=f)) for text, f in labels) + 16
    w, h = label_w + k * cell + 20, label_w + k * cell + 50
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.text((w // 2, 12), "predicted", fill="#59636e", font=font, anchor="mt")
    top = label_w + 30
    for j, (text, small) in enumerate(labels):  # column labels, rotated
        label = Image.new("RGBA", (label_w, 16), (255, 255, 255, 0))
        draw_right(ImageDraw.Draw(label), (label_w - 4, 8), text, small, "#1f2328")
        rotated = label.rotate(90, expand=True)
        image.paste(rotated, (label_w + j * cell + cell // 2 - 8, top - label_w - 4), rotated)
    for i, ((text, small), row) in enumerate(zip(labels, matrix, strict=True)):
        y = top + i * cell
        draw_right(draw, (label_w - 8, y + cell // 2), text, small, "#1f2328")
        total = sum(row)
        for j, v in enumerate(row):
            share = v / total if total else 0.0
            base = (26, 127, 55) if i == j else (207, 34, 46)
            a = 0.0 if v == 0 else 0.12 + 0.78 * share
            colour = tuple(int(255 - a * (255 - c)) for c in base)
            x = label_w + j * cell
            draw.rectangle((x, y, x + cell - 2, y + cell - 2), fill=colour)
            draw.text(
                (x + cell // 2, y + cell // 2), str(v), fill="white" if a > 0.55 else "#1f2328", font=font, anchor="mm"
            )
    draw.text((label_w - 8, top - 6), "true", fill="#59636e", font=font, anchor="rb")
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    write_bytes(path, buf.getvalue())
    return [text for text, _ in labels]


def config_block(config: dict[str, Any]) -> str:
    return f"<details><summary>the full configuration</summary><pre>{esc(json.dumps(config, indent=2))}</pre></details>"


def curves_section(history: list[dict[str, Any]], best: int) -> str:
    """Loss and accuracy per epoch that ran, as charts and as the table they are drawn from; the best epoch (whose
    checkpoint ships) marked."""
    epochs = [r["epoch"] for r in history]
    loss = line_chart("loss", epochs, {"train": [r["train_loss"] for r in history],
                                       "validation": [r["val_loss"] for r in history]}, "cross-entropy")  # fmt: skip
    acc = line_chart("accuracy", epochs, {"train": [r["train_acc"] for r in history],
                                          "validation": [r["val_acc"] for r in history]}, "accuracy")  # fmt: skip
    keys = ("train_loss", "val_loss", "train_acc", "val_acc")
    rows = [[f"{r['epoch']} (best)" if r["epoch"] == best else r["epoch"], *(f"{r[k]:.4f}" for k in keys),
             f"{r['lr']:.2e}", f"{r['seconds']:.1f}", f"{r['samples_per_s']:.0f}"] for r in history]  # fmt: skip
    head = ["epoch", "train loss", "val loss", "train acc", "val acc", "lr", "seconds", "samples/s"]
    return (
        f'<section><h2>Training</h2><div class="row"><div>{loss}</div><div>{acc}</div></div>'
        f"<details><summary>per epoch (metrics.jsonl)</summary>{table(head, rows, 'epochs')}</details></section>"
    )


def artifacts_section(manifest: dict[str, Any], bundle_link: str) -> str:
    """One row per artifact: its file, size, precision, where it was checked, and how it measured up."""
    p = manifest["parity"]
    fp32 = manifest["artifacts"].get("onnx", {}).get("bytes")
    variants = {v["artifact"]: v for v in p.get("variants", [])}
    rows = []
    for kind, art in manifest["artifacts"].items():
        size = f"{art['bytes'] / 1024:.0f} KiB" + (f" ({art['bytes'] / fp32:.0%})" if fp32 and kind != "onnx" else "")
        link = (f'<a href="{esc(bundle_link)}/{esc(art["path"])}">{esc(art["path"])}</a>', "")
        failed = [f for f in p["failed"] if f.startswith(f"{kind} on ")]
        if kind in variants:
            v = variants[kind]
            gate = f"agreement {v['top1_agreement']:.4f}, accuracy {v['accuracy']:.4f} ({signed(-v['accuracy_drop'])})"
        else:
            gate = f"{p['atol']:g} + {p['rtol']:g}·|ref|" + (f": {len(failed)} failed" if failed else "")
        rows.append([kind, link, size, art.get("precision", "fp32"), ", ".join(art.get("checked_on", [])), gate,
                     verdict(not failed)])  # fmt: skip
    head = ["artifact", "file", "size", "precision", "checked on", "gate", ""]
    failures = "".join(f"<li>{esc(f)}</li>" for f in p["failed"])
    more = f'<ul class="bad">{failures}</ul>' if failures else ""
    return (
        f'<section><h2>Bundle</h2><p class="muted">{p["checks"]} parity checks (batch sizes '
        f"{', '.join(map(str, p['batch_sizes']))}; worst max_abs_err {p['max_abs_err']:.2e}). "
        f'<a href="{esc(bundle_link)}/manifest.json">manifest.json</a>, '
        f'<a href="{esc(bundle_link)}/parity.json">parity.json</a></p>{table(head, rows, "left")}{more}</section>'
    )


def model_section(data: dict[str, Any], model: dict[str, Any], config: dict[str, Any]) -> str:
    source = data.get("source", {})
    lr = config.get("learning_rate") or config.get("lr") or "default"
    rows = [
        ["data", f"{source.get('name', '?')} {source.get('root', '')}".strip()],
        ["classes", ", ".join(data["classes"])],
        ["input", f"{data['input_shape']}, mean {data['mean']}, std {data['std']}"],
        ["model", f"{model['arch']} {json.dumps(model['kwargs'])}"],
        ["optimiser", f"{config.get('optimizer')} lr {lr}, {config.get('schedule')} schedule, "
                      f"batch {config.get('batch_size')}, {config.get('epochs')} epochs"],
        ["runtime", f"device {config.get('device')}, amp {config.get('amp')}, seed {config.get('seed')}"],
    ]  # fmt: skip
    return f"<section><h2>Data and model</h2>{table(['', ''], rows, 'left')}{config_block(config)}</section>"


def run_page(run: dict[str, Any]) -> str:
    """report.html of `modelship run`: what was trained, how well, what was shipped, and whether it may ship."""
    manifest, history, ev = run["manifest"], run["history"], run["evaluation"]
    best = next(r for r in history if r["epoch"] == run["best_epoch"])
    p = manifest["parity"]
    value, detail = run["accuracy"]
    items = [
        ("accuracy", value, detail),
        ("best val_acc", f"{best['val_acc']:.4f}", f"training's pass, epoch {best['epoch']} of {len(history)}"),
        ("parity", "PASS" if not [f for f in p["failed"] if " at batch " in f] else "FAIL",
         f"{p['checks']} checks, worst {p['max_abs_err']:.1e}"),
    ]  # fmt: skip
    for v in p.get("variants", []):
        art = manifest["artifacts"][v["artifact"]]
        share = art["bytes"] / manifest["artifacts"]["onnx"]["bytes"]
        items.append(
            (v["artifact"], f"{v['accuracy']:.4f}", f"{signed(-v['accuracy_drop'])} vs fp32, {share:.0%} size")
        )
    items.append(
        ("time", f"{run['seconds']:.0f}s", f"training {run['train_seconds']:.0f}s, export {run['export_seconds']:.0f}s")
    )
    body = tiles(items) + curves_section(history, best["epoch"])
    if ev is not None:
        body += evaluation_section(ev, "confusion_matrix.png", "Validation set")
    body += artifacts_section(manifest, run["bundle_link"]) + model_section(run["data"], run["model"], run["config"])
    source = run["data"]["source"].get("name", "?")
    subtitle = f"{source}, {run['model']['arch']}, bundle {manifest['name']}, {manifest['created']}"
    badge = "PASS" if run["passed"] else "FAIL"
    return page(f"modelship run: {manifest['name']}", subtitle, badge, run["reason"], body)
