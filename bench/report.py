"""The bench's report: targets checked against the rows, and bench/results/latest.{json,md}."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from harness import RESULTS, Row, log


@dataclass
class Report:
    started: str
    commit: str
    nproc: int
    machine: str
    python: str
    workers: int
    seconds_per_row: float
    kms_standin_cpu_ms_per_call: float | None = None
    rows: list[Row] = field(default_factory=list)
    esdk: list[dict[str, Any]] = field(default_factory=list)
    leak: dict[str, Any] = field(default_factory=dict)
    scale: dict[str, Any] = field(default_factory=dict)
    # Bulk operations run once each (rewrap, customer erasure): items/s, KMS calls per item.
    lifecycle: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)


def find(rows: list[Row], target: str, operation: str, concurrency: int, latency: int = 0) -> Row | None:
    for row in rows:
        if (row.target, row.operation, row.concurrency, row.kms_latency_ms) == (
            target,
            operation,
            concurrency,
            latency,
        ):
            return row
    return None


def ratio(numerator: Any, denominator: Any) -> float | None:
    """numerator / denominator, or None when either is missing (a row that did not run)."""
    if not numerator or not denominator:
        return None
    return round(float(numerator) / float(denominator), 3)


def machine_cost(row: Row | None, floor_row: Row | None) -> str:
    """Where a row's throughput goes, against the floor's: on a saturated machine, throughput is
    about the inverse of the CPU every process spends per item."""
    if row is None or floor_row is None:
        return ""
    parts = [f"{r.target} {r.cpu_ms_per_item} + PostgreSQL {r.pg_cpu_ms_per_item}" for r in (row, floor_row)]
    return "CPU ms/item: " + " vs ".join(parts)


def evaluate(report: Report, levels: list[int]) -> list[dict[str, Any]]:
    rows, targets = report.rows, []

    def check(name: str, value: float | None, goal: float, detail: str) -> None:
        targets.append({"target": name, "value": value, "goal": goal, "met": value is not None and value >= goal,
                        "detail": detail})  # fmt: skip

    for level in levels:
        tok_local = find(rows, "vault-local", "tokenize", level)
        # The floor of record runs the vault's own concurrency model (async); the sync floor's
        # ratio is shown beside it.
        floor_row = find(rows, "floor-async", "tokenize", level)
        check(f"tokenize(local) / floor-async, c={level}", ratio(tok_local and tok_local.items_per_s,
              floor_row and floor_row.items_per_s), 0.6, "items/s; " + machine_cost(tok_local, floor_row))  # fmt: skip
        sync_floor = find(rows, "floor", "tokenize", level)
        targets.append({"target": f"tokenize(local) / floor (sync), c={level}", "goal": None, "met": None,
                        "value": ratio(tok_local and tok_local.items_per_s, sync_floor and sync_floor.items_per_s),
                        "detail": "for reference: a floor in the thread-pool model"})  # fmt: skip
        tok_kms = find(rows, "vault-kms", "tokenize", level)
        esdk_default = next(
            (e for e in report.esdk if e["suite"] == "default" and e["concurrency"] == level), None
        )
        check(f"tokenize(kms) / ESDK default, c={level}", ratio(tok_kms and tok_kms.items_per_s,
              esdk_default and esdk_default["ops_per_s"]), 1.5, "ops/s")  # fmt: skip
        for provider in ("vault-local", "vault-kms"):
            tok, det = find(rows, provider, "tokenize", level), find(rows, provider, "detokenize", level)
            check(f"detokenize / tokenize ({provider}), c={level}",
                  ratio(det and det.items_per_s, tok and tok.items_per_s), 1.0, "items/s")  # fmt: skip
    for provider in ("vault-local", "vault-kms"):
        for level in (8, 32):
            batch, single = (
                find(rows, provider, "batch_tokenize", level),
                find(rows, provider, "tokenize", level),
            )
            if batch and single:
                check(f"batch tokenize items/s / tokenize req/s ({provider}), c={level}",
                      ratio(batch.items_per_s, single.requests_per_s), 5.0, "")  # fmt: skip
    for level in (8, 32):
        audited = find(rows, "vault-local", "tokenize", level)
        quiet = find(rows, "vault-local-noaudit", "tokenize", level)
        if audited and quiet:
            check(f"tokenize with audit / without (local), c={level}",
                  ratio(audited.items_per_s, quiet.items_per_s), 0.85, "issue 3: at most 15% cost")  # fmt: skip
    for provider in ("vault-local", "vault-kms"):
        for level in levels:
            keyed, plain = (
                find(rows, provider, "tokenize_idempotent", level),
                find(rows, provider, "tokenize", level),
            )
            if keyed and plain:
                targets.append({"target": f"tokenize with Idempotency-Key / without ({provider}), c={level}",
                                "goal": None, "met": None, "value": ratio(keyed.items_per_s, plain.items_per_s),
                                "detail": "for reference: what the key's claim and stored answer cost"})  # fmt: skip
    top = max(levels)
    for operation in ("tokenize", "detokenize"):
        slow, fast = find(rows, "vault-kms", operation, top, 10), find(rows, "vault-kms", operation, top)
        check(f"{operation} with 10 ms KMS latency / without, c={top}",
              ratio(slow and slow.items_per_s, fast and fast.items_per_s), 0.8, "")  # fmt: skip
    calls = [row.kms_calls_per_item for row in rows if row.target == "vault-kms" and row.operation in
             ("tokenize", "detokenize") and row.kms_calls_per_item is not None]  # fmt: skip
    targets.append({"target": "KMS calls per single tokenize/detokenize", "value": max(calls) if calls else None,
                    "goal": 1.0, "met": bool(calls) and all(abs(c - 1.0) < 0.02 for c in calls),
                    "detail": "every vault-kms single row"})  # fmt: skip
    if report.scale:
        small, large = report.scale.get("10000"), report.scale.get(str(max(int(k) for k in report.scale)))
        if small and large:
            growth = round(large["p50_ms"] / small["p50_ms"] - 1, 3)
            targets.append({"target": "detokenize p50 growth, 10k -> 1M records", "value": growth, "goal": 0.15,
                            "met": growth <= 0.15, "detail": "fraction; at most 0.15"})  # fmt: skip
            if small.get("lookup_p50_ms") and large.get("lookup_p50_ms"):
                growth = round(large["lookup_p50_ms"] / small["lookup_p50_ms"] - 1, 3)
                targets.append({"target": "lookup p50 growth, 10k -> 1M records", "value": growth, "goal": 0.20,
                                "met": growth <= 0.20, "detail": "fraction; at most 0.20 (issue 12)"})  # fmt: skip
    if report.leak.get("half") and report.leak.get("full"):
        half, full = max(report.leak["half"]["rss_mb"]), max(report.leak["full"]["rss_mb"])
        growth = round(full / half - 1, 3)
        targets.append({"target": "worker RSS growth, 50k -> 100k requests", "value": growth, "goal": 0.10,
                        "met": growth <= 0.10, "detail": "fraction; at most 0.10"})  # fmt: skip
    return targets


def lifecycle_check(op: dict[str, Any]) -> str:
    """What SQL found after the operation: records a rewrap left on the old key, or the erased
    customer's tombstones and live records."""
    if "left_unmoved" in op:
        return f"left unmoved: {op['left_unmoved']}"
    if "tombstones" in op:
        return f"tombstones: {op['tombstones']}, live: {op.get('left_live')}"
    return ""


def write(report: Report) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = asdict(report)
    (RESULTS / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# pii-vault benchmark",
        "",
        f"Run {report.started} on commit `{report.commit}`; nproc {report.nproc}, {report.machine}, "
        f"Python {report.python}; vault and floor with {report.workers} workers; {report.seconds_per_row} s per row; "
        f"KMS stand-in CPU {report.kms_standin_cpu_ms_per_call} ms per call.",
        "",
        "| target | operation | conc. | KMS latency | items/s | req/s | p50 ms | p99 ms | CPU ms/item"
        " | PostgreSQL CPU ms/item | KMS calls/item | peak RSS MB/worker | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report.rows:
        lines.append(
            f"| {row.target} | {row.operation} | {row.concurrency} | {row.kms_latency_ms} ms | {row.items_per_s} | "
            f"{row.requests_per_s} | {row.p50_ms} | {row.p99_ms} | {row.cpu_ms_per_item} | {row.pg_cpu_ms_per_item} | "
            f"{row.kms_calls_per_item} | "
            f"{row.peak_rss_mb_per_worker} | {row.errors} |"
        )
    lines += ["", "## AWS Encryption SDK (in-process encrypt, KMS stand-in, no cache)", "",
              "| suite | processes | conc. | ops/s | p50 ms | p99 ms | CPU ms/op | KMS calls/op | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in report.esdk:
        lines.append(
            f"| {e['suite']} | {e['processes']} | {e['concurrency']} | {e['ops_per_s']} | {e['p50_ms']} | "
            f"{e['p99_ms']} | {e.get('cpu_ms_per_op')} | {e.get('kms_calls_per_op')} | {e.get('peak_rss_mb')} |"
        )
    if report.lifecycle:
        lines += ["", "## Bulk operations", "",
                  "| operation | records | KMS latency | seconds | items/s | KMS calls/item | peak RSS MB/worker | check |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for op in report.lifecycle:
            latency = "—" if op.get("kms_latency_ms") is None else f"{op['kms_latency_ms']} ms"
            lines.append(f"| {op['operation']} | {op['records']} | {latency} | {op.get('seconds', '—')} | "
                         f"{op['items_per_s']} | {op.get('kms_calls_per_item') or '—'} | "
                         f"{op.get('peak_rss_mb_per_worker', '—')} | {lifecycle_check(op)} |")  # fmt: skip
    if report.scale:
        lines += ["", "## Detokenize and lookup latency against table size (concurrency 8)", "",
                  "| records | p50 ms | p99 ms | req/s | lookup p50 ms | lookup p99 ms | lookup req/s |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in report.scale.values():
            lines.append(f"| {s['records']} | {s['p50_ms']} | {s['p99_ms']} | {s['requests_per_s']} | "
                         f"{s.get('lookup_p50_ms', '—')} | {s.get('lookup_p99_ms', '—')} | "
                         f"{s.get('lookup_requests_per_s', '—')} |")  # fmt: skip
    if report.leak:
        lines += ["", "## Worker RSS under sustained tokenize (concurrency 32)", ""]
        for mark, value in report.leak.items():
            lines.append(f"- after {value['requests']} requests ({mark}): {value['rss_mb']} MB")
    lines += ["", "## Targets", "", "| target | value | goal | met | detail |", "|---|---|---|---|---|"]
    for t in report.targets:
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        goal = t["goal"] if t["goal"] is not None else "—"
        lines.append(f"| {t['target']} | {t['value']} | {goal} | {met} | {t.get('detail', '')} |")
    (RESULTS / "latest.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {RESULTS / 'latest.md'} and latest.json")


def write_audit_cost(report: Report) -> None:
    """--audit-cost's rows and summary: bench/results/audit-cost.json."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit-cost.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
