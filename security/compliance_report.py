"""The compliance report on disk: JSON (the whole report, for machines) and PDF (for people:
result, each control with its status and evidence, then the privacy impact assessment draft),
laid out with reportlab's platypus."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def report_dir(settings: Any) -> Path:
    c = settings.compliance
    return Path(c.report_dir) if c.report_dir else settings.resolved_data_dir() / "compliance"


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return p


def write_pdf(report: dict[str, Any], path: str | Path) -> Path:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle
    from xml.sax.saxutils import escape

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    styles = getSampleStyleSheet()
    body, small = styles["BodyText"], styles["BodyText"].clone("small", fontSize=8, leading=10)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report["generated_at"]))
    flow: list[Any] = [
        Paragraph(f"ORFEAS compliance report: {report['profile'].upper()}", styles["Title"]),
        Paragraph(f"Result: <b>{report['result'].upper()}</b> (required controls: {report['summary']['pass']} pass, "
                  f"{report['summary']['fail']} fail, {report['summary']['skipped']} skipped)", body),
        Paragraph(escape(f"Generated {when}; data directory {report['data_dir']}; manifests {report['manifests']}"),
                  small),
        Spacer(1, 4 * mm),
    ]
    colour = {"pass": colors.HexColor("#1b7f3a"), "fail": colors.HexColor("#b3261e"), "skipped": colors.grey}
    rows = [["Control", "Required", "Status", "Evidence"]]
    marks = {True: "ok", False: "FAIL", None: "n/a"}
    style = [("GRID", (0, 0), (-1, -1), 0.25, colors.grey), ("VALIGN", (0, 0), (-1, -1), "TOP"),
             ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8e8e8"))]
    for i, c in enumerate(report["controls"], start=1):
        evidence = "<br/>".join(f"[{marks[e['ok']]}] {escape(e['text'])}" for e in c["evidence"])
        rows.append([Paragraph(f"<b>{escape(c['id'])}</b><br/>{escape(c['title'])}", small),
                     "yes" if c["required"] else "advisory", c["status"].upper(), Paragraph(evidence, small)])
        style.append(("TEXTCOLOR", (2, i), (2, i), colour[c["status"]]))
    table = Table(rows, colWidths=[45 * mm, 18 * mm, 16 * mm, 101 * mm], repeatRows=1)
    table.setStyle(TableStyle(style))
    flow += [table, Spacer(1, 6 * mm), Paragraph("Privacy impact assessment (draft)", styles["Heading2"])]
    pia = report["privacy_impact"]
    rows = [["Store", "Personal data", "Readers", "Encrypted", "Retention"]]
    for s in pia["stores"]:
        r = s["readers"]
        rows.append([Paragraph(escape(s["store"]), small),
                     Paragraph(escape(", ".join(s["pii_types"]) or "none found"), small),
                     Paragraph(escape(f"roles {', '.join(r['roles'])}; {len(r['keys'])} key(s)"), small),
                     "yes" if s["encrypted_at_rest"] else "no",
                     "for ever" if s.get("retention_days") is None else f"{s['retention_days']:g} days"])
    t = Table(rows, colWidths=[42 * mm, 50 * mm, 50 * mm, 17 * mm, 21 * mm], repeatRows=1)
    t.setStyle(TableStyle(style[:3]))
    flow += [t, Spacer(1, 3 * mm), Paragraph("Risks", styles["Heading3"])]
    flow += [Paragraph(escape("- " + r), body) for r in pia["risks"]] or [Paragraph("none found", body)]
    flow += [Spacer(1, 3 * mm), Paragraph(escape("Method: " + pia["method"]), small)]
    SimpleDocTemplate(str(p), pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=15 * mm,
                      bottomMargin=15 * mm, title=f"ORFEAS compliance report ({report['profile']})",
                      author="orfeas compliance check").build(flow)
    return p


def write_report(report: dict[str, Any], directory: str | Path) -> dict[str, str]:
    """Both files, named by profile and time: {json: path, pdf: path}."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(report["generated_at"]))
    base = Path(directory) / f"compliance-{report['profile']}-{stamp}"
    return {"json": str(write_json(report, base.with_suffix(".json"))),
            "pdf": str(write_pdf(report, base.with_suffix(".pdf")))}
