"""Turns records into tables: median [min-max] over runs, per-run ratios to each baseline, CPU, notes, targets."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bench.cpu import MIN_WINDOW_S, OTHER_LOAD_PCT

# Each gets an ours/<baseline> ratio column when it ran beside ours; ours-nometrics is ours with metrics off.
BASELINES = ("amqtt", "mosquitto", "lean", "ours-nometrics", "before")
# Pairs compared as one system against another: (system, baseline), for each ratio column.
PAIRS = (*(("ours", b) for b in BASELINES), ("ours-memory", "before"), ("ours-memory", "before-memory"))
# Issue 11: metrics may cost at most this share of sendEvent throughput.
METRICS_COST_LIMIT = 0.03
SCENARIO_ORDER = ("send", "connect", "memory", "keepalive", "reconnect")


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    better: str  # "higher" or "lower"
    optional: bool = False  # not in older results files: no row when no record has it


FIELDS: dict[str, tuple[Field, ...]] = {
    "send": (Field("delivered_per_s", "delivered events/s", "higher"),
             Field("p50_ms", "end-to-end p50 ms", "lower"),
             Field("p99_ms", "end-to-end p99 ms", "lower"),
             Field("cpu_ms_per_1k_calls", "service CPU ms per 1,000 calls", "lower", optional=True)),
    "connect": (Field("rate", "CONNECT to SUBACK /s", "higher"),
                Field("late_rate", "/s while the table is 80-90% full", "higher")),
    "memory": (Field("kb_per_endpoint", "RSS KB per idle endpoint", "lower"),),
    "keepalive": (Field("cpu_pct", "broker CPU % of one core", "lower"),),
    "reconnect": (Field("rate", "CONNECT to SUBACK /s", "higher"),
                  Field("late_rate", "/s while the table is 80-90% full", "higher")),
}


@dataclass
class Spread:
    values: list[float]
    runs: int  # runs attempted, including failed ones
    failed: int = 0  # runs whose measurement failed (as opposed to a figure that does not apply)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def text(self) -> str:
        if not self.values:
            return "failed" if self.failed else ("n/a" if self.runs else "-")
        low, high = min(self.values), max(self.values)
        shown = fmt(statistics.median(self.values))
        spread = f" [{fmt(low)}-{fmt(high)}]" if len(self.values) > 1 else ""
        missing = f" ({len(self.values)}/{self.runs} runs)" if len(self.values) < self.runs else ""
        return shown + spread + missing


def fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def key_of(record: dict[str, Any]) -> tuple[int, int, int]:
    qos = record.get("qos")
    return SCENARIO_ORDER.index(record["scenario"]), record["n"], -1 if qos is None else qos


def title(record: dict[str, Any]) -> str:
    n, requested = record["n"], record.get("extra", {}).get("requested_n", record["n"])
    size = f"N={n:,}" + (f" ({requested:,} asked)" if requested != n else "")
    return {
        "send": f"sendEvent {size} QoS {record.get('qos')}",
        "connect": f"connect {size}",
        "memory": f"idle memory {size}",
        "keepalive": f"keepalive {size}",
        "reconnect": f"reconnect storm after a restart {size}",
    }[record["scenario"]]


def group(records: list[dict[str, Any]]) -> dict[tuple[int, int, int], dict[str, list[dict[str, Any]]]]:
    groups: dict[tuple[int, int, int], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["scenario"] in FIELDS:
            groups[key_of(record)][record["system"]].append(record)
    return dict(sorted(groups.items()))


def value(record: dict[str, Any], field: str) -> float | None:
    found = record.get("values", {}).get(field)
    return None if found is None or record.get("error") else float(found)


def ratio_spread(ours: list[dict[str, Any]], base: list[dict[str, Any]], field: str) -> Spread:
    """ours / baseline for each run in which both were measured."""
    by_run = {r["run"]: value(r, field) for r in base}
    ratios = []
    for record in ours:
        mine, theirs = value(record, field), by_run.get(record["run"])
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return Spread(ratios, len(ours))


def before_code(machine: dict[str, Any]) -> str:
    return f"; before: {machine['before']}" if machine.get("before") else ""


def metric_rows(records: list[dict[str, Any]], systems: list[str]) -> tuple[list[str], list[list[str]]]:
    pairs = [(mine, base) for mine, base in PAIRS if base in systems and mine in systems]
    header = ["metric", *systems, *[f"{mine}/{base}" for mine, base in pairs], "better"]
    rows = []
    for by_system in group(records).values():
        sample = next(iter(by_system.values()))[0]
        for field in FIELDS[sample["scenario"]]:
            if field.optional and not any(field.name in r.get("values", {})
                                          for runs in by_system.values() for r in runs):
                continue
            row = [f"{title(sample)}: {field.label}"]
            for system in systems:
                runs = by_system.get(system, [])
                found = [v for r in runs if (v := value(r, field.name)) is not None]
                row.append(Spread(found, len(runs), sum(bool(r.get("error")) for r in runs)).text())
            for mine, base in pairs:
                row.append(ratio_spread(by_system.get(mine, []), by_system.get(base, []), field.name).text())
            row.append(field.better)
            rows.append(row)
    return header, rows


def cpu_rows(records: list[dict[str, Any]], systems: list[str]) -> tuple[list[str], list[list[str]]]:
    """Median service and generator CPU per measurement, in % of one core; gen max = busiest generator process."""
    header = ["measurement", *[f"{s}: service / gen (max) / machine, limit" for s in systems]]
    rows = []
    for by_system in group(records).values():
        sample = next(iter(by_system.values()))[0]
        if sample["scenario"] == "memory":
            continue
        row = [title(sample)]
        for system in systems:
            cpus = [r["cpu"] for r in by_system.get(system, []) if r.get("cpu")]
            if not cpus:
                row.append("-")
                continue
            service = statistics.median(c["service_pct"] for c in cpus)
            generator = statistics.median(c["generator_pct"] for c in cpus)
            busiest = max(c["generator_max_pct"] for c in cpus)
            machine = statistics.median(c["machine_pct"] for c in cpus)
            limits = sorted({c.get("limit", "?") for c in cpus})
            row.append(f"{service:.0f}% / {generator:.0f}% ({busiest:.0f}%) / {machine:.0f}%, {'+'.join(limits)}")
        rows.append(row)
    return header, rows


def notes(records: list[dict[str, Any]]) -> list[str]:
    """Each distinct note or error once, with the runs it appeared in; CPU limits and other load summarised."""
    seen: dict[tuple[str, str], set[int]] = defaultdict(set)
    other_load: dict[str, float] = {}
    for record in sorted(records, key=lambda r: (r["system"], r["run"])):
        label = title(record) if record["scenario"] in FIELDS else f"{record['scenario']} N={record['n']:,}"
        where = f"{record['system']}, {label}"
        texts = [t for t in record.get("notes", []) if not t.startswith("other load")]
        if record.get("error"):
            texts.append(f"FAILED: {record['error']}")
        if record.get("cpu", {}).get("limit") == "generator":
            texts.append("the generator, not the system, was the limit: read the figure as a lower bound")
        for text in texts:
            seen[(where, text)].add(record["run"])
        other = record.get("cpu", {}).get("other_pct", 0.0)
        if other >= OTHER_LOAD_PCT and record.get("cpu", {}).get("seconds", 0.0) >= MIN_WINDOW_S:
            seen[(where, "other load on the machine during the measurement")].add(record["run"])
            other_load[where] = max(other_load.get(where, 0.0), other)
    lines = []
    for (where, text), runs in seen.items():
        peak = f" (up to {other_load[where]:.0f}% of a core)" if text.startswith("other load") else ""
        lines.append(f"{where} (runs {', '.join(map(str, sorted(runs)))}): {text}{peak}")
    return lines


# ------------------------------------------------------------------ targets


def _median(records: list[dict[str, Any]], system: str, scenario: str, n: int, field: str,
            qos: int | None = None) -> float | None:
    values = [v for r in records if r["system"] == system and r["scenario"] == scenario and r["n"] == n
              and r.get("qos") == qos and (v := value(r, field)) is not None]
    return statistics.median(values) if values else None


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _spread(records: list[dict[str, Any]], field: str) -> Spread:
    return Spread([v for r in records if (v := value(r, field)) is not None], len(records))


def targets(records: list[dict[str, Any]], idle_size: int) -> list[list[str]]:
    """The first round's targets, checked on medians (ratios: median of the per-run ratios)."""
    out: list[list[str]] = []
    groups = group(records)
    for (scenario_index, n, qos), by_system in groups.items():
        scenario = SCENARIO_ORDER[scenario_index]
        ours = by_system.get("ours", [])
        if scenario == "send":
            ratio = ratio_spread(ours, by_system.get("mosquitto", []), "delivered_per_s").median
            p99_ours = _median(records, "ours", "send", n, "p99_ms", qos)
            p99_mosq = _median(records, "mosquitto", "send", n, "p99_ms", qos)
            ok = None if ratio is None or p99_ours is None or p99_mosq is None else (
                ratio >= 1.5 and p99_ours < p99_mosq)
            out.append([f"sendEvent N={n:,} QoS {qos}: >= 1.5x mosquitto stack events/s, lower p99",
                        f"{fmt(ratio) if ratio else '-'}x, p99 {fmt(p99_ours) if p99_ours else '-'} vs "
                        f"{fmt(p99_mosq) if p99_mosq else '-'} ms", _verdict(ok)])
        elif scenario == "connect":
            ratio = ratio_spread(ours, by_system.get("amqtt", []), "rate").median
            out.append([f"connect N={n:,}: >= 3x bare amqtt", f"{fmt(ratio)}x" if ratio else "-",
                        _verdict(None if ratio is None else ratio >= 3)])
        elif scenario == "memory" and n == idle_size:
            kb = _median(records, "ours", "memory", n, "kb_per_endpoint")
            out.append([f"memory N={n:,}: <= 15 KB per idle endpoint", f"{fmt(kb)} KB" if kb is not None else "-",
                        _verdict(None if kb is None else kb <= 15)])
        elif scenario == "keepalive" and n == idle_size:
            cpu = _median(records, "ours", "keepalive", n, "cpu_pct")
            out.append([f"keepalive N={n:,}, PINGREQ every 10 s: < 20% of one core",
                        f"{fmt(cpu)}%" if cpu is not None else "-", _verdict(None if cpu is None else cpu < 20)])
    out += flatness(records, idle_size)
    return out


def flatness(records: list[dict[str, Any]], idle_size: int) -> list[list[str]]:
    """Connect rate at the idle size (10k) within 20% of the rate at the smallest size (1k)."""
    sizes = sorted({r["n"] for r in records if r["system"] == "ours" and r["scenario"] == "connect"})
    if len(sizes) < 2 or idle_size not in sizes or sizes[0] == idle_size:
        return []
    small = _median(records, "ours", "connect", sizes[0], "rate")
    large = _median(records, "ours", "connect", idle_size, "rate")
    share = None if not small or large is None else large / small
    return [[f"connect rate at N={idle_size:,} within 20% of N={sizes[0]:,}",
             f"{fmt(share * 100)}%" if share is not None else "-", _verdict(None if share is None else share >= 0.8)]]


def issue13_targets(records: list[dict[str, Any]], idle_size: int) -> list[list[str]]:
    """Issue 13's targets: against the lean stack for sendEvent, against Mosquitto (on its own, or as
    the lean stack's broker, which is the same program and config) for connects; medians of the
    per-run ratios, with [min-max] over the runs."""
    out: list[list[str]] = []
    for (scenario_index, n, qos), by_system in group(records).items():
        scenario = SCENARIO_ORDER[scenario_index]
        ours = by_system.get("ours", [])
        if scenario == "send":
            lean = by_system.get("lean", [])
            need = 2.3 if qos == 0 else 1.8
            ratio = ratio_spread(ours, lean, "delivered_per_s")
            p99_ours, p99_lean = _spread(ours, "p99_ms"), _spread(lean, "p99_ms")
            times, mine, theirs = ratio.median, p99_ours.median, p99_lean.median
            ok = None if times is None or mine is None or theirs is None else times >= need and mine < theirs
            durable = " (durable)" if qos == 1 else ""
            out.append([f"sendEvent N={n:,} QoS {qos}{durable}: >= {need:g}x lean events/s, lower p99",
                        f"{ratio.text()}x; p99 {p99_ours.text()} vs {p99_lean.text()} ms", _verdict(ok)])
            if qos == 0:
                cpu = _spread(ours, "cpu_ms_per_1k_calls")
                out.append([f"sendEvent N={n:,} QoS 0: <= 100 ms of service CPU per 1,000 calls",
                            f"{cpu.text()} ms", _verdict(None if cpu.median is None else cpu.median <= 100)])
        elif scenario in ("connect", "reconnect"):
            base = "mosquitto" if by_system.get("mosquitto") else "lean"
            ratio = ratio_spread(ours, by_system.get(base, []), "rate")
            what = "connect" if scenario == "connect" else "reconnect storm after a restart"
            out.append([f"{what} N={n:,}: >= 0.5x Mosquitto's CONNECT to SUBACK rate ({base})",
                        f"{ratio.text()}x; {_spread(ours, 'rate').text()} vs "
                        f"{_spread(by_system.get(base, []), 'rate').text()} /s",
                        _verdict(None if ratio.median is None else ratio.median >= 0.5)])
        elif scenario == "memory" and n == idle_size:
            kb = _spread(ours, "kb_per_endpoint")
            out.append([f"memory N={n:,}: <= 4 KB per idle endpoint", f"{kb.text()} KB",
                        _verdict(None if kb.median is None else kb.median <= 4)])
        elif scenario == "keepalive" and n == idle_size:
            out.append([f"keepalive N={n:,}, PINGREQ every 10 s: no regression (compare with RESULTS.md)",
                        f"{_spread(ours, 'cpu_pct').text()}% of one core", "reported"])
    return out


def metrics_cost(records: list[dict[str, Any]]) -> list[list[str]]:
    """Issue 11: ours' sendEvent throughput with metrics on, against ours-nometrics in the same runs."""
    out: list[list[str]] = []
    for (scenario_index, n, qos), by_system in group(records).items():
        off = by_system.get("ours-nometrics", [])
        if SCENARIO_ORDER[scenario_index] != "send" or not off or not by_system.get("ours"):
            continue
        ratio = ratio_spread(by_system["ours"], off, "delivered_per_s")
        cost = None if ratio.median is None else (1 - ratio.median) * 100
        out.append([f"sendEvent N={n:,} QoS {qos}: metrics cost <= {METRICS_COST_LIMIT:.0%} of events/s "
                    "(ours vs ours-nometrics)",
                    f"{ratio.text()}x; cost {fmt(cost)}%" if cost is not None else f"{ratio.text()}x",
                    _verdict(None if cost is None else cost <= METRICS_COST_LIMIT * 100)])
    return out


TARGET_SETS = {"round1": targets, "issue13": issue13_targets}


# ------------------------------------------------------------------ rendering


def render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), line, *body])


def machine_lines(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    return [
        f"Date: {meta['started']} (took {meta.get('minutes', 0):.1f} min)",
        f"Command: {meta['command']}",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['physical_cores']} physical), "
        f"{m['ram_gb']} GB RAM; {m['os']}, kernel {m['kernel']}; Python {m['python']}",
        f"Packages: {packages}; mosquitto {m['mosquitto'] or 'not installed'}",
        f"Code: endpoint-broker {m['code']}{before_code(m)}; load average at start {m['load_average_at_start']}",
        f"Profile: {meta['profile']['name']}, {meta['profile']['runs']} runs{layout(meta['profile'])}; "
        f"limits: {meta['limits']}",
    ]


def layout(profile: dict[str, Any]) -> str:
    """What the issue13 profile changes about how the figures were taken (nothing for older files)."""
    parts = []
    if profile.get("one_endpoint_per_user"):
        parts.append("one endpoint per user, sendEvent names it")
    if profile.get("pin_cpus"):
        service, generator = profile["pin_cpus"]
        parts.append(f"service pinned to CPU {service}, generator and bench to CPU {generator}")
    return "".join(f"; {part}" for part in parts)


def report(result: dict[str, Any], markdown: bool = False) -> str:
    records, systems, meta = result["records"], result["systems"], result["meta"]
    idle_size = meta["profile"]["idle_size"]
    heading = "### " if markdown else "== "
    parts = ["\n".join(("- " + line if markdown else line) for line in machine_lines(meta))]
    parts.append(f"{heading}Results: median [min-max] over runs; ratios are ours/baseline per run")
    parts.append(render(*metric_rows(records, systems), markdown))
    parts.append(f"{heading}CPU during each measurement, % of one core (median over runs; gen max = busiest "
                 "generator process, max over runs)")
    parts.append(render(*cpu_rows(records, systems), markdown))
    check = TARGET_SETS[meta["profile"].get("target_set", "round1")]
    target_rows = [*check(records, idle_size), *metrics_cost(records)] if "ours" in systems else []
    if target_rows:
        parts.append(f"{heading}Targets (ours)")
        parts.append(render(["target", "measured", "verdict"], target_rows, markdown))
    found = notes(records)
    if found:
        parts.append(f"{heading}Notes")
        parts.append("\n".join(f"- {n}" for n in found))
    return "\n\n".join(parts) + "\n"
