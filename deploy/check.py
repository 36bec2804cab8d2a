#!/usr/bin/env python3
"""Checks that every metric the dashboard and the alert rules use is one entitled exports.

The reference is the Metrics table of docs/metrics.md (metric, type, labels). A name
counts if it is in the table, or is a histogram's/summary's `_bucket`, `_sum` or
`_count` series. `_bucket` needs a histogram. Also checks that the dashboard is valid
JSON with an `expr` on every target, and that each `by (...)`/label matcher on an
entitled metric names a label that metric has (or one Prometheus adds: namespace, pod,
job, ...).

With --metrics FILE (a /metrics scrape of a running entitled), the `# TYPE` lines of
the scrape are checked too: a `_bucket` series on a metric the binary exports as a
summary is an error, and names used but absent from the scrape are listed (metrics
that appear only once something happens, such as the store's, are normal there).

Standard library only (PyYAML is used when installed, else the rule file is read as
text). Exit status 1 on any error.
"""
import argparse
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
# Series that are not entitled's own but may appear in expressions.
PROMETHEUS_BUILTINS = {"up"}
# Labels added by the scrape (PodMonitor / scrape.yml relabelling) or by PromQL itself.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint", "service", "le", "quantile"}
NAME = re.compile(r"\b(entitled_[a-z0-9_]+)\b")
SUFFIXES = ("_bucket", "_sum", "_count")


def documented_metrics(path):
    text = path.read_text(encoding="utf-8")
    # The "Metrics" section (the page's title or a second-level heading) up to the next
    # heading of the same or a higher level, or the end of the file.
    m = re.search(r"^#{1,2} Metrics\n(.*?)(?=^#{1,2} |\Z)", text, re.S | re.M)
    if not m:
        sys.exit(f"{path}: no 'Metrics' section")
    table = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`entitled_"):
            continue
        name = cells[0].strip("`")
        kind = cells[1].split()[0]            # "histogram (1 µs … 50 ms)" -> "histogram"
        labels = set(re.findall(r"`([a-z_]+)`", cells[2]))
        # Label values are quoted in parentheses, e.g. `result` (`success`, `failure`):
        # keep only the first backticked word before each "(" group as a label name.
        names = set()
        for part in re.split(r",(?![^()]*\))", cells[2]):
            w = re.match(r"\s*`([a-z_]+)`", part)
            if w:
                names.add(w.group(1))
        table[name] = (kind, names or labels)
    if not table:
        sys.exit(f"{path}: the Metrics table has no rows")
    return table


def scrape_types(path):
    types, present = {}, set()
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            present.add(re.split(r"[{ ]", line, 1)[0])
    return types, present


def dashboard_exprs(path, errors):
    try:
        dash = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        errors.append(f"{path}: invalid JSON: {e}")
        return []
    out = []

    def walk(panels):
        for p in panels:
            if p.get("type") == "row":
                walk(p.get("panels", []))
                continue
            targets = p.get("targets", [])
            if not targets:
                errors.append(f"{path}: panel {p.get('title')!r} has no targets")
            for t in targets:
                if not t.get("expr"):
                    errors.append(f"{path}: panel {p.get('title')!r} target {t.get('refId')} has no expr")
                else:
                    out.append((f"panel {p.get('title')!r}", t["expr"]))
    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and q:
            out.append((f"variable ${v['name']}", q))
    return out


def rule_exprs(path, errors):
    text = path.read_text(encoding="utf-8")
    try:
        import yaml  # optional
    except ImportError:
        return [(f"{path.name} (whole file, PyYAML not installed)", text)]
    doc = yaml.safe_load(text)
    out = []
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            if not r.get("expr"):
                errors.append(f"{path}: rule {name} has no expr")
                continue
            out.append((f"rule {name}", str(r["expr"])))
            for k in ("summary", "description"):
                if k in r.get("annotations", {}):
                    out.append((f"rule {name} annotation {k}", r["annotations"][k]))
    return out


def base_name(name, table):
    if name in table:
        return name, None
    for s in SUFFIXES:
        if name.endswith(s) and name[: -len(s)] in table:
            return name[: -len(s)], s
    return None, None


def check_labels(where, expr, table, errors):
    # label matchers right after a metric name: name{a="..", b=~".."}
    for m in re.finditer(r"\b(entitled_[a-z0-9_]+)\s*\{([^}]*)\}", expr):
        base, _ = base_name(m.group(1), table)
        if not base:
            continue
        for lab in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)):
            if lab not in table[base][1] and lab not in TARGET_LABELS:
                errors.append(f"{where}: {m.group(1)} has no label {lab!r} (documented: {sorted(table[base][1]) or 'none'})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=ROOT / "docs" / "metrics.md", type=pathlib.Path,
                    help="the page holding the Metrics table (default: docs/metrics.md)")
    ap.add_argument("--dashboard", default=HERE / "grafana" / "entitled.json", type=pathlib.Path)
    ap.add_argument("--rules", default=HERE / "prometheus" / "alerts.yml", type=pathlib.Path)
    ap.add_argument("--metrics", help="a /metrics scrape of a running entitled")
    a = ap.parse_args()

    table = documented_metrics(a.doc)
    doc = a.doc.resolve()
    doc = doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else a.doc
    errors = []
    exprs = dashboard_exprs(a.dashboard, errors) + rule_exprs(a.rules, errors)
    scraped = scrape_types(a.metrics) if a.metrics else None
    used = set()
    for where, expr in exprs:
        for name in NAME.findall(expr):
            base, suffix = base_name(name, table)
            if base is None:
                errors.append(f"{where}: {name} is not in the Metrics table of {doc}")
                continue
            used.add(base)
            kind = table[base][0]
            if suffix and kind not in ("histogram", "summary"):
                errors.append(f"{where}: {name}: {base} is a {kind}, it has no {suffix} series")
            if suffix == "_bucket" and kind != "histogram":
                errors.append(f"{where}: {name}: {base} is not a histogram")
            if scraped and suffix == "_bucket" and scraped[0].get(base, "histogram") != "histogram":
                errors.append(f"{where}: {name}: the binary exports {base} as a {scraped[0][base]} (no buckets)")
        check_labels(where, expr, table, errors)
        for name in re.findall(r"(?<![a-z_])([a-z_][a-z0-9_]*)\s*(?:\{|\[)", expr):
            if not name.startswith("entitled_") and name in PROMETHEUS_BUILTINS:
                used.add(name)

    print(f"Metrics table ({doc}): {len(table)} metrics; expressions checked: {len(exprs)}; "
          f"entitled metrics used: {len(used & set(table))}")
    unused = sorted(set(table) - used)
    if unused:
        print("not used by the dashboard or the rules (fine):", ", ".join(unused))
    if scraped:
        types, present = scraped
        for base in sorted(used & set(table)):
            if base in types and types[base] != table[base][0]:
                print(f"note: {doc} calls {base} a {table[base][0]}, the binary exports a {types[base]}")
        absent = sorted(b for b in used & set(table) if b not in types)
        if absent:
            print("used but not in this scrape (exported once they first change):", ", ".join(absent))
    for e in errors:
        print("ERROR:", e)
    print("metric-name check:", "FAILED" if errors else "ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
