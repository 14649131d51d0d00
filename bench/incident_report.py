"""The incident report: tables, plots and the computed answer, from the replay's and the simulation's Runs.

Nothing here is a conclusion written in advance: every sentence of the
answer is chosen by comparing measured numbers (`answer`), so a different
machine, seed or traffic can reach a different one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.incident_series import FREE_FRACTION, Run, itl_over_time, summarize

GiB = float(1 << 30)
MiB = float(1 << 20)
BASELINE = "contiguous (grow)"  # the incident's stack: one region per request, grown while decoding


# ---- numbers -------------------------------------------------------------------------------------------
def summaries(runs: Sequence[Run]) -> dict[str, dict[str, float]]:
    return {run.name: summarize(run) for run in runs}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def _fmt(x: float, digits: int = 1) -> str:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "n/a" if math.isnan(x) else "inf"
    return f"{x:,.{digits}f}"


# ---- tables --------------------------------------------------------------------------------------------
_CONCURRENCY = (
    ("peak seqs", lambda s: _fmt(s["peak_running"], 0)),
    ("mean seqs", lambda s: _fmt(s["mean_running"])),
    (f"refused, >= {FREE_FRACTION:.0%} free", lambda s: _fmt(s["refusals_free_memory"], 0)),
)
_FAILURES = (
    ("growth failures", lambda s: _fmt(s["growth_failures"], 0)),
    ("preemptions", lambda s: _fmt(s["preemptions"], 0)),
    ("moves", lambda s: _fmt(s["moves"], 0)),
)
_MEMORY = (
    ("KV held / reserved", lambda s: _fmt(s["kv_held_over_reserved"], 2)),
    ("free (mean)", lambda s: _pct(s["mean_free_fraction"])),
    ("largest hole (mean)", lambda s: _pct(s["mean_largest_hole_fraction"])),
    ("ITL p50 ms", lambda s: _fmt(s["itl_p50_s"] * 1e3, 2)),
    ("ITL p99 ms", lambda s: _fmt(s["itl_p99_s"] * 1e3, 1)),
)
REPLAY_COLUMNS = (
    *_CONCURRENCY, ("refused (all)", lambda s: _fmt(s["refusals"], 0)), *_FAILURES,
    ("MiB copied", lambda s: _fmt(s["bytes_moved"] / MiB, 2)),
    ("copy ms", lambda s: _fmt(s["move_seconds"] * 1e3, 1)),
    *_MEMORY, ("engine s", lambda s: _fmt(s["duration_s"], 2)),
)
SIM_COLUMNS = (
    *_CONCURRENCY,
    ("free at refusal p50 / max", lambda s: f"{_pct(s['free_fraction_at_refusal_p50'])} / "
                                            f"{_pct(s['free_fraction_at_refusal_max'])}"),
    *_FAILURES,
    ("GiB copied", lambda s: _fmt(s["bytes_moved"] / GiB, 0)),
    ("copy s", lambda s: _fmt(s["move_seconds"], 1)),
    *_MEMORY, ("TTFT p99 s", lambda s: _fmt(s["ttft_p99_s"], 0)),
    ("completed", lambda s: _fmt(s["completed"], 0)),
    ("tokens/s", lambda s: _fmt(s["generated_tokens"] / s["duration_s"], 0) if s["duration_s"] else "n/a"),
)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}"


def table(stats: Mapping[str, Mapping[str, float]], columns: Sequence[tuple[str, Any]]) -> str:
    head = "| configuration | " + " | ".join(name for name, _ in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [f"| {name} | " + " | ".join(cell(s) for _, cell in columns) + " |" for name, s in stats.items()]
    return "\n".join([head, rule, *rows])


# ---- the answer ----------------------------------------------------------------------------------------
def effects(sim: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each change against the incident's stack (contiguous grow): prefix cache alone, paging alone, both."""
    base = sim[BASELINE]
    changes = {"prefix caching alone": "contiguous (grow) + prefix cache", "paging alone": "paged",
               "both": "paged + prefix cache"}
    out = {}
    for label, name in changes.items():
        s = sim[name]
        out[label] = {
            "mean_seqs_x": ratio(s["mean_running"], base["mean_running"]),
            "completed_x": ratio(s["completed"], base["completed"]),
            "held_over_reserved": s["kv_held_over_reserved"],
            "stranded_free": s["mean_free_fraction"] - s["mean_largest_hole_fraction"],
            "preemptions": s["preemptions"],
            "itl_p99_x": ratio(s["itl_p99_s"], base["itl_p99_s"]),
            "refusals_free_memory": s["refusals_free_memory"],
        }
    return out


def effects_table(eff: Mapping[str, Mapping[str, float]], base: Mapping[str, float]) -> str:
    rows = ["| change (vs contiguous grow) | mean seqs | completed | KV held / reserved | free but stranded "
            "in small holes | preemptions | P99 ITL |", "|---|---:|---:|---:|---:|---:|---:|",
            f"| none (the incident's stack) | 1.00x | 1.00x | {base['kv_held_over_reserved']:.2f} | "
            f"{base['mean_free_fraction'] - base['mean_largest_hole_fraction']:.1%} | {base['preemptions']:,.0f} "
            "| 1.00x |"]
    for label, e in eff.items():
        rows.append(f"| {label} | {e['mean_seqs_x']:.2f}x | {e['completed_x']:.2f}x | {e['held_over_reserved']:.2f} "
                    f"| {e['stranded_free']:.1%} | {e['preemptions']:,.0f} | {e['itl_p99_x']:.2f}x |")
    return "\n".join(rows)


def answer(replay: Mapping[str, Mapping[str, float]], sim: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Which change first, and why: chosen from the numbers by the rule stated in the first sentence."""
    lines = ["Rule: the change to make first is the one that removes the incident's first symptom (requests "
             f"refused while >= {FREE_FRACTION:.0%} of KV memory is free) on the real engine; if both or neither "
             "do, the one that runs more concurrent sequences at GPU scale."]
    paged_ok = replay["paged"]["refusals_free_memory"] == 0
    contiguous_bad = replay[BASELINE]["refusals_free_memory"] > 0
    eff = effects(sim)
    paging, prefix = eff["paging alone"], eff["prefix caching alone"]
    if paged_ok and contiguous_bad:
        first, why = "paging", (f"on the real engine the contiguous layout refused admission "
                                f"{replay[BASELINE]['refusals_free_memory']:,.0f} times while >= "
                                f"{FREE_FRACTION:.0%} of the arena was free and the paged layout 0 times, and at GPU "
                                f"scale prefix caching alone still leaves {prefix['stranded_free']:.1%} of memory "
                                f"free but in holes too small to use (paging: {paging['stranded_free']:.1%})")
    else:
        first = "paging" if paging["mean_seqs_x"] >= prefix["mean_seqs_x"] else "prefix caching"
        why = "the replay does not separate them, so the GPU-scale concurrency decides"
    lines.append(f"**Answer: {first} first**, because {why}.")
    lines.append(f"At GPU scale, paging alone runs {paging['mean_seqs_x']:.2f}x the mean concurrent sequences of "
                 f"the incident's stack and keeps {paging['held_over_reserved']:.0%} of reserved KV holding tokens; "
                 f"prefix caching alone runs {prefix['mean_seqs_x']:.2f}x and keeps "
                 f"{prefix['held_over_reserved']:.0%}.")
    lines.append(_both_sentence(eff))
    lines.append(_latency_sentence(eff, sim))
    lines.append(_sim_symptom_sentence(sim))
    return lines


def _both_sentence(eff: Mapping[str, Mapping[str, float]]) -> str:
    both, singles = eff["both"], (eff["paging alone"], eff["prefix caching alone"])
    best_completed = max(e["completed_x"] for e in singles)
    verdict = ("so the prefix cache is worth adding second" if both["completed_x"] > best_completed
               else "so adding the second change bought nothing more here")
    return (f"Both together run {both['mean_seqs_x']:.2f}x the mean sequences and complete "
            f"{both['completed_x']:.2f}x the requests (best single change: {best_completed:.2f}x), {verdict}.")


def _latency_sentence(eff: Mapping[str, Mapping[str, float]], sim: Mapping[str, Mapping[str, float]]) -> str:
    parts = [f"{label} {e['itl_p99_x']:.2f}x ({e['preemptions']:,.0f} preemptions)" for label, e in eff.items()]
    text = ("P99 inter-token latency against the incident's stack (a preempted sequence's wait counts as one "
            "gap): " + ", ".join(parts) + ".")
    p50 = ratio(sim["paged"]["itl_p50_s"], sim[BASELINE]["itl_p50_s"])
    if p50 > 1:
        text += (f" The median is {p50:.2f}x the incident stack's with paging: it holds more sequences, and each "
                 "decode step reads the KV of all of them.")
    return text


def _sim_symptom_sentence(sim: Mapping[str, Mapping[str, float]]) -> str:
    base = sim[BASELINE]
    if base["refusals_free_memory"] > 0:
        return (f"The simulation reproduces the symptom too: {base['refusals_free_memory']:,.0f} refusals while "
                f">= {FREE_FRACTION:.0%} was free ({base['requests_refused_free_memory']:,.0f} requests).")
    return (f"In the simulation no refusal happened with >= {FREE_FRACTION:.0%} free (at most "
            f"{_pct(base['free_fraction_at_refusal_max'])} was free at a refusal of the incident's stack): the "
            f"largest request needs {base['largest_request_fraction']:.2%} of the arena, so there "
            "fragmentation shows as memory stranded in small holes, region moves and preemptions rather than as "
            "refusals.")


def targets(replay: Mapping[str, Mapping[str, float]], sim: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The issue's target, checked on both runs: paged >= 2x the sequences of contiguous, 0 refusals while free."""
    lines = []
    for label, stats, paged in (("real engine", replay, "paged"), ("GPU simulation", sim, "paged")):
        for contiguous in (BASELINE, "contiguous (reserve max)"):
            peak = ratio(stats[paged]["peak_running"], stats[contiguous]["peak_running"])
            mean = ratio(stats[paged]["mean_running"], stats[contiguous]["mean_running"])
            met = "met" if peak >= 2 and stats[paged]["refusals_free_memory"] == 0 else "not met"
            lines.append(f"- {label}, paged vs {contiguous}: peak sequences {peak:.2f}x, mean {mean:.2f}x, paged "
                         f"refusals while memory free {stats[paged]['refusals_free_memory']:,.0f}: target {met}")
    lines.extend(_slo_target(sim, name) for name in sim if "SLO scheduling" in name)
    return lines


def _slo_target(sim: Mapping[str, Mapping[str, float]], name: str) -> str:
    """SLO scheduling's target: paged P99 ITL no worse than reserve-max's, with paged's capacity kept."""
    reserve, stats = sim["contiguous (reserve max)"], sim[name]
    itl = ratio(stats["itl_p99_s"], reserve["itl_p99_s"])
    peak = ratio(stats["peak_running"], reserve["peak_running"])
    met = "met" if itl <= 1 and peak > 1 else "not met"
    return (f"- GPU simulation, {name} vs contiguous (reserve max): P99 ITL {stats['itl_p99_s'] * 1e3:.0f} vs "
            f"{reserve['itl_p99_s'] * 1e3:.0f} ms ({itl:.2f}x), peak sequences {peak:.2f}x: target {met}")


# ---- plots ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


def plot_memory(runs: Sequence[Run], path: Path, time_unit: str) -> None:
    """Free memory vs the largest free hole over time, one panel per configuration."""
    plt = _pyplot()
    cols = min(3, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, run in zip(axes.flat, runs, strict=False):
        t = [s.t for s in run.samples]
        ax.plot(t, [s.free_blocks / run.num_blocks for s in run.samples], label="free", lw=0.8)
        ax.plot(t, [s.largest_hole / run.num_blocks for s in run.samples], label="largest free hole", lw=0.8)
        ax.plot(t, [s.tokens_held / (run.num_blocks * run.block_size) for s in run.samples],
                label="holding tokens", lw=0.8)
        ax.axhline(FREE_FRACTION, color="grey", ls=":", lw=0.8)
        ax.set_title(run.name, fontsize=9)
        ax.set_xlabel(f"time ({time_unit})")
    axes.flat[0].set_ylabel("fraction of KV memory")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lines(runs: Sequence[Run], path: Path, series: str, window_s: float, ylabel: str, time_unit: str) -> None:
    """One line per configuration: P99 inter-token latency per window ("itl") or running sequences ("running")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        if series == "itl":
            points = itl_over_time(run, window_s)
            ax.plot([t for t, _ in points], [v * 1e3 for _, v in points], label=run.name, lw=1)
        else:
            ax.plot([s.t for s in run.samples], [s.running for s in run.samples], label=run.name, lw=0.8)
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel(ylabel)
    if series == "itl":
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the whole report ----------------------------------------------------------------------------------
def write(out: Path, replay_runs: Sequence[Run], outputs_identical: bool, sim_runs: Sequence[Run],
          settings: Mapping[str, Any]) -> Path:
    """report.md, summary.json and the PNGs into `out`; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    replay, sim = summaries(replay_runs), summaries(sim_runs)
    replay_window = max(replay_runs[0].samples[-1].t / 20, 1e-3) if replay_runs[0].samples else 1.0
    plot_memory(replay_runs, out / "replay_memory.png", "engine seconds")
    plot_lines(replay_runs, out / "replay_itl_p99.png", "itl", replay_window, "P99 inter-token latency (ms)",
               "engine seconds")
    plot_memory(sim_runs, out / "sim_memory.png", "s")
    plot_lines(sim_runs, out / "sim_itl_p99.png", "itl", 60.0, "P99 inter-token latency (ms), per minute", "s")
    plot_lines(sim_runs, out / "sim_running.png", "running", 60.0, "running sequences", "s")
    (out / "summary.json").write_text(json.dumps({"settings": settings, "replay": replay, "sim": sim,
                                                  "outputs_identical": outputs_identical}, indent=1, default=str))
    text = _markdown(replay, outputs_identical, sim, settings)
    path = out / "report.md"
    path.write_text(text)
    return path


def _markdown(replay: Mapping[str, Mapping[str, float]], outputs_identical: bool,
              sim: Mapping[str, Mapping[str, float]], settings: Mapping[str, Any]) -> str:
    r, g = settings["replay"], settings["sim"]
    return "\n".join([
        "# Incident: contiguous vs paged KV", "",
        f"`{settings['command']}` on {settings['machine']}, {settings['date']}.", "",
        "## 1. The real engine (built-in model, same requests, same arena)", "",
        f"{r['num_requests']} requests of the seeded mix at scale {r['scale']} (seed {r['seed']}), Poisson "
        f"arrivals at {r['rate_per_step']} per engine step, {r['num_kv_blocks']} KV blocks of {r['block_size']} "
        f"tokens, max_num_batched_tokens {r['max_num_batched_tokens']}, prefix caching off, greedy. "
        f"Outputs identical across layouts: {'yes' if outputs_identical else 'NO'}.", "",
        table(replay, REPLAY_COLUMNS), "",
        "![memory](replay_memory.png)", "", "![itl](replay_itl_p99.png)", "",
        "## 2. GPU scale (simulated: 80 GB H100, Llama-3-8B KV shape)", "",
        f"{g['gpu']}. Traffic: {g['traffic']}; {g['num_requests']:,} requests, the same for every "
        "configuration. Step time = weights / bw + context tokens x 128 KiB / bw + prompt tokens x 2 x params / "
        "FLOPS + 2 x copied bytes / bw (bench/incident_sim.py states the constants and sources).", "",
        table(sim, SIM_COLUMNS), "",
        "![memory](sim_memory.png)", "", "![itl](sim_itl_p99.png)", "", "![running](sim_running.png)", "",
        "## 3. What each change does (simulation)", "",
        effects_table(effects(sim), sim[BASELINE]), "",
        "## 4. Which change first", "",
        *[line + "\n" for line in answer(replay, sim)],
        "## Targets", "", *targets(replay, sim), "",
    ])
