"""Figures and the report of ``serve_load.py``: percentiles, inter-token latency from streaming
timestamps, batch-size histograms, and the markdown summary."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from serve_clients import PROMPT_TOKENS


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def gaps_ms(token_times: Sequence[float]) -> list[float]:
    """Inter-token latency of one stream: ms between consecutive tokens' arrivals (the first
    token's wait is time to first token, not counted here)."""
    return [(b - a) * 1000 for a, b in zip(token_times, token_times[1:], strict=False)]


def itl_summary(gaps: Sequence[float]) -> dict:
    return {"tokens": len(gaps), "itl_ms_p50": pct(gaps, 50), "itl_ms_p99": pct(gaps, 99)}


def split_gaps(
    streams: Sequence[Sequence[float]], start: float, end: float, skip: int = 0
) -> tuple[list, list]:
    """(gaps that overlap [start, end], gaps wholly outside it), in ms, over all streams;
    each stream's first ``skip`` tokens (the batch ramping up) are left out of both."""
    during, outside = [], []
    for times in streams:
        times = times[skip:]
        for a, b in zip(times, times[1:], strict=False):
            (during if a < end and b > start else outside).append((b - a) * 1000)
    return during, outside


def batch_histogram(before: Counter, after: Counter) -> dict[int, int]:
    """Steps by batch size between two snapshots of an engine counter (sizes ascending)."""
    diff = after - before
    return {size: diff[size] for size in sorted(diff)}


def write_results(result: dict, out_dir: Path) -> Path:
    device = result["device"].replace(" ", "_")
    stem = out_dir / f"serve_load-{device}-{result['date'][:10]}{result['tag']}"
    profiles = [load["engine"].pop("profile_top", None) for load in result["loads"]]
    if any(profiles):
        stem.with_suffix(".profile.txt").write_text("\n".join(p for p in profiles if p))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    h, c = result["hit_overhead"], result["cold_ties"]
    lines = [
        f"# Serving load, {result['device']}, {result['date']}",
        "",
        f"model: {result['model']}; adapters: {result['adapters']} x rank {result['rank']} on "
        f"all seven projections; versions {result['versions']}",
        "",
        f"- merge-cache hit vs named adapter (server side, median): "
        f"{h['merge_hit_us']:.1f} µs vs {h['named_adapter_us']:.1f} µs: a hit adds "
        f"**{h['hit_adds_us']:.1f} µs** (target <= 20 µs)",
        f"- cold TIES merge of 3 adapters, {PROMPT_TOKENS}-token prompt: merge "
        f"{c['cold_ties_merge_ms_p50']:.2f} ms of TTFT {c['cold_ties_ttft_ms_p50']:.2f} ms = "
        f"**{100 * c['cold_ties_merge_share_of_ttft_p50']:.1f}%** (target <= 5%); named adapter "
        f"TTFT {c['named_ttft_ms_p50']:.2f} ms",
    ]
    prefix = result.get("shared_prefix")
    if prefix is not None:
        lines.append(
            f"- shared {prefix['prefix_tokens']}-token prefix (+{prefix['suffix_tokens']} own "
            f"tokens), one request at a time: TTFT p50 {prefix['cached_ttft_ms_p50']:.2f} ms "
            f"cached vs {prefix['uncached_ttft_ms_p50']:.2f} ms uncached = **"
            f"{prefix['ratio']:.2f}x** (target <= 0.3); server queue / prefill p50 "
            f"{prefix['cached_queue_ms_p50']:.2f} / {prefix['cached_prefill_ms_p50']:.2f} ms "
            f"cached, {prefix['uncached_queue_ms_p50']:.2f} / "
            f"{prefix['uncached_prefill_ms_p50']:.2f} ms uncached"
        )
        for name in ("cached", "uncached"):
            if (steps := prefix.get(f"{name}_steps")) is not None:
                lines.append(
                    f"  - {name}, a request's engine steps: {steps['engine_ms_per_request']:.2f}"
                    f" ms on the engine thread ({steps['engine_cpu_ms_per_request']:.2f} ms CPU), "
                    + _on_device(steps["device_ms_per_request"])
                )
    profile = result.get("merge_path_profile")
    if profile is not None:
        lines.append(
            f"- a fresh TIES merge resolved by the merger alone (idle engine, {profile['runs']} "
            f"runs): {profile['acquire_ms_p50']:.2f} ms, of which the merge itself "
            f"{profile['merge_ms_p50']:.2f} ms (p50); torch's profile: {profile['table']}"
        )
    for load in result["loads"]:
        lines += load_lines(load)
    m = result.get("merge_during_streams")
    if m is not None:
        lines += [
            "",
            f"A fresh `{m['strategy']}` merge of 3 adapters ({m['merge_wall_ms']:.0f} ms wall, "
            f"server merge_ms {m['merge_ms']:.0f}) fired while {m['streams']} streams ran: "
            f"inter-token latency of those streams during the merge p50 "
            f"{m['during']['itl_ms_p50']:.2f} ms, p99 **{m['during']['itl_ms_p99']:.2f} ms** "
            f"({m['during']['tokens']} gaps) vs without p50 {m['without']['itl_ms_p50']:.2f} ms, "
            f"p99 {m['without']['itl_ms_p99']:.2f} ms: p99 ratio **{m['p99_ratio']:.2f}** "
            "(target <= 1.5)",
        ]
        for name, window in (("during", "the merge"), ("after", "after it")):
            if (steps := m.get(f"steps_{name}")) is not None:
                lines.append(f"- engine steps {window}: {steps_text(steps, (50, 99))}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return stem


def steps_text(split: dict, quantiles: Sequence[int]) -> str:
    """A step split (``serve_probes.step_split``): wall, CPU and device ms at each quantile."""
    parts = [
        f"p{q} {split[f'step_ms_p{q}']:.2f} ms on the engine thread "
        f"({split[f'step_cpu_ms_p{q}']:.2f} ms CPU), " + _on_device(split[f"step_device_ms_p{q}"])
        for q in quantiles
    ]
    return f"{split['steps']} steps, " + "; ".join(parts)


def _on_device(ms: float | None) -> str:
    return f"{ms:.2f} ms on the device" if ms is not None else "no device"


def tokens_per_s_full(samples) -> float:
    """Tokens a second that arrived between the first request's sending and the last one's."""
    sent = [s.token_times[0] - s.ttft_ms / 1000 for s in samples if s.token_times]
    first, last = min(sent), max(sent)
    tokens = sum(first <= t <= last for s in samples for t in s.token_times)
    return tokens / max(last - first, 1e-9)


def ttft_after_burst(samples, concurrency: int) -> dict:
    """TTFT of the requests sent after the opening burst (the first ``concurrency`` requests,
    sent at once when the level starts, whose prompts queue behind each other): the tail of
    the steady state, beside the whole run's."""

    def sent(s) -> float:
        return s.token_times[0] - s.ttft_ms / 1000

    timed = sorted((s for s in samples if s.token_times), key=sent)
    later = [s.ttft_ms for s in timed[concurrency:]]
    return {
        "requests": len(later),
        "ttft_ms_p50": pct(later, 50) if later else None,
        "ttft_ms_p99": pct(later, 99) if later else None,
    }


def load_lines(load: dict) -> list[str]:
    """One load phase's section of the report."""
    engine = load["engine"]
    lines = [
        "",
        f"## Load at concurrency {load['concurrency']}"
        + ("" if load.get("plan_ahead", True) else ", waiting first (no step planned ahead)"),
        "",
        f"{load['requests']} requests (max batch {load['max_batch_size']}, prefill budget "
        f"{load.get('max_prefill_tokens', 2048)} tokens), mix {load['mix']}, "
        f"{load['max_new_tokens']} new tokens each: {load['requests_per_s']:.1f} req/s, "
        f"**{load['tokens_per_s']:.0f} tokens/s** ({load['tokens_per_s_full']:.0f} while all "
        f"{load['concurrency']} were in flight); engine {engine['steps']} steps "
        f"({engine['prefills']} prefills, {engine['decodes']} decodes, {engine['mixed_steps']} "
        f"mixed, {engine.get('planned_ahead', 0)} planned ahead, {engine['preemptions']} "
        f"preemptions), step p50 {engine['step_ms_p50']:.1f} ms, "
        f"p99 {engine['step_ms_p99']:.1f} ms, the engine thread in steps (not admitting or "
        f"idle) {100 * engine['engine_busy_share']:.0f}% of the wall time",
        "",
        f"Inter-token latency (all streams, per token): p50 {load['itl']['itl_ms_p50']:.2f} ms, "
        f"p99 {load['itl']['itl_ms_p99']:.2f} ms over {load['itl']['tokens']} gaps",
        "",
        *_after_burst(load.get("ttft_after_burst")),
        "Decode batch sizes reached (steps): "
        + ", ".join(f"{k}: {v}" for k, v in engine["decode_batch_sizes"].items()),
        "",
        "Mean ms per step by phase: "
        + ", ".join(f"{k} {v:.3f}" for k, v in engine["phase_ms_per_step"].items()),
        "",
    ]
    stalls = load.get("stalls")
    if stalls is not None:  # seconds since the level began
        lines += [
            "Slowest steps (at s: ms): "
            + ", ".join(f"{s['at_s']:.2f}: {s['ms']:.1f}" for s in stalls["slowest_steps"])
            + "; slowest admissions (at s: ms, of which on the CPU): "
            + ", ".join(
                f"{s['at_s']:.2f}: {s['ms']:.1f}" + _cpu(s) for s in stalls["slowest_admissions"]
            )
            + "; slowest slot writes (at s: ms, on the CPU): "
            + (
                ", ".join(
                    f"{s['at_s']:.2f}: {s['ms']:.1f}" + _cpu(s)
                    for s in stalls.get("slowest_slot_writes", [])
                )
                or "none"
            )
            + "; slowest first tokens (sent at s: TTFT ms): "
            + ", ".join(f"{s['sent_at_s']:.2f}: {s['ttft_ms']:.0f}" for s in stalls["slowest_ttft"])
            + "; garbage collections: "
            + (
                ", ".join(
                    f"{g} {v['count']} ({v['total_ms']:.1f} ms, max {v['max_ms']:.1f})"
                    for g, v in stalls["gc"].items()
                )
                or "none"
            )
            + _compiles(stalls.get("jit_compiles")),
            "",
        ]
        if stalls.get("device"):
            lines += [_device(stalls["device"]), ""]
    lines += [
        "| class | count | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms | "
        "ITL p50 ms | ITL p99 ms | merge share of TTFT p50 | queue / merge / prefill p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, row in load["by_kind"].items():
        lines.append(
            f"| {kind} | {row['count']} | {row['ttft_ms_p50']:.1f} | {row['ttft_ms_p99']:.1f} | "
            f"{row['total_ms_p50']:.1f} | {row['total_ms_p99']:.1f} | {row['itl_ms_p50']:.2f} | "
            f"{row['itl_ms_p99']:.2f} | {100 * row['merge_share_of_ttft_p50']:.1f}% | "
            f"{row['queue_ms_p50']:.1f} / {row['merge_ms_p50']:.1f} / {row['prefill_ms_p50']:.1f} |"
        )
    return lines


def _after_burst(after: dict | None) -> list[str]:
    if not after or after["ttft_ms_p50"] is None:
        return []
    ratio = after["ttft_ms_p99"] / after["ttft_ms_p50"]
    return [
        f"TTFT of the {after['requests']} requests sent after the opening burst: p50 "
        f"{after['ttft_ms_p50']:.1f} ms, p99 {after['ttft_ms_p99']:.1f} ms ({ratio:.1f}x)",
        "",
    ]


def _compiles(compiles: dict | None) -> str:
    """The level's Triton JIT compiles (kernel specializations first met under load)."""
    if compiles is None:
        return ""
    return f"; Triton JIT compiles: {compiles['count']} ({compiles['total_ms']:.0f} ms)" + "".join(
        f", {c['kernel']} at {c['at_s']:.2f} s: {c['ms']:.0f} ms" for c in compiles["slowest"]
    )


def _device(timeline: dict) -> str:
    """The device's side of the level: busy share, gaps, and the time of each kind of step."""
    decode = ", ".join(
        f"{rows} rows {g['steps']}x {g['ms_mean']:.2f} ms"
        for rows, g in timeline["decode_steps_by_rows"].items()
    )
    mixed = ", ".join(
        f"{tokens} tokens {g['steps']}x {g['ms_mean']:.2f} ms (+{g['rows_mean']:.0f} rows)"
        for tokens, g in timeline["mixed_steps_by_prompt_tokens"].items()
    )
    return (
        f"Device (CUDA events around each step's launches): busy "
        f"{100 * timeline['busy_share']:.1f}% of {timeline['span_ms']:.0f} ms; gaps between "
        f"steps {timeline['gap_ms_total']:.0f} ms (p50 {timeline['gap_ms_p50']:.3f}, p99 "
        f"{timeline['gap_ms_p99']:.3f} ms); decode-only steps by rows: {decode or 'none'}; "
        f"prefill and mixed steps by prompt tokens: {mixed or 'none'}"
    )


def _cpu(event: dict) -> str:
    """`` (CPU x ms)``: the engine thread's own CPU time in it, when recorded."""
    return f" (CPU {event['cpu_ms']:.1f})" if "cpu_ms" in event else ""
