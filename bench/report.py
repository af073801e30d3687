"""results.json, RESULTS.md and a picture of the sharing benchmark, from the sections of one run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.sections import OPS, Section
from student_trainer.figures import save_figure, subplots
from student_trainer.markdown import markdown_table


def _cell(value) -> str:
    if isinstance(value, float):
        # NaN, the one value unequal to itself
        if value != value:
            return "-"
        # an error or a divergence: its magnitude, not "0.000"
        if value and abs(value) < 1e-3:
            return f"{value:.2e}"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def table(columns: list[str], rows: list[dict]) -> list[str]:
    return markdown_table(columns, ([_cell(row.get(c)) for c in columns] for row in rows)).splitlines()


def markdown(
    sections: list[Section], machine: dict, command: str, preset: str, repetitions: int, server: dict | None = None
) -> str:
    device = machine["device_name"] if machine["device"] == "cpu" else f"{machine['device']} ({machine['device_name']})"
    lines = [
        "# akd bench",
        "",
        f"- command: `{command}` (config: {preset}; {repetitions} repetitions, medians)",
        f"- machine: {machine['cores']} cores ({machine['cpu']}), device {device}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), Python {machine['python']}, LitServe "
        f"{machine['litserve'] or 'not installed'}, PyTriton {machine.get('pytriton') or 'not installed'}",
        f"- date: {machine['date']}, commit {machine['git_commit'] or 'unknown'}",
        *([f"- every server: {', '.join(f'{k} = {v!r}' for k, v in server.items())}"] if server else []),
        "",
        "## Targets",
        "",
        "| benchmark | target | measured | met | behind it |",
        "|---|---|---|---|---|",
    ]
    for s in sections:
        for t in s.targets:
            lines.append(
                f"| {s.title} | {t.what} {t.op} {t.threshold:g} | {t.measured:.3f} | "
                f"{'yes' if t.met else '**no**'} | {t.context} |"
            )
    for s in sections:
        lines += ["", f"## {s.title}", "", s.about + f" ({s.seconds:.0f} s)", ""]
        lines += table(s.columns, s.rows)
        for extra in s.tables:
            lines += ["", f"**{extra.title}**", ""] + table(extra.columns, extra.rows)
        if s.notes:
            lines += [""] + [f"- {n}" for n in s.notes]
    return "\n".join(lines) + "\n"


def write(
    out: Path, sections: list[Section], machine: dict, command: str, preset: str, repetitions: int, config: dict
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command,
        "preset": preset,
        "machine": machine,
        "config": config,
        "sections": [s.to_dict() for s in sections],
    }
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    (out / "RESULTS.md").write_text(markdown(sections, machine, command, preset, repetitions, config.get("server")))
    sharing = next((s for s in sections if s.key == "sharing"), None)
    if sharing and sharing.rows:
        sharing_figure(sharing, next((s for s in sections if s.key == "peer"), None), out / "sharing.png")


def repeated_targets(runs: list[list[Section]]) -> list[dict]:
    """Each target of the runs (in the first run's order), with its value in every run that measured it, their
    median, which the target is judged on, and their spread."""
    found: dict[tuple, dict] = {}
    for r, sections in enumerate(runs, 1):
        for s in sections:
            for t in s.targets:
                key = (s.title, t.what, t.op, t.threshold)
                entry = found.setdefault(
                    key, {"benchmark": s.title, "what": t.what, "op": t.op, "threshold": t.threshold, "runs": {}}
                )
                entry["runs"][r] = t.measured
    for entry in found.values():
        values = list(entry["runs"].values())
        entry["median"] = statistics.median(values)
        entry["min"], entry["max"] = min(values), max(values)
        entry["met"] = OPS[entry["op"]](entry["median"], entry["threshold"])
    return list(found.values())


def write_repeated(
    out: Path, runs: list[list[Section]], machine: dict, command: str, preset: str, repetitions: int
) -> None:
    """DIR/RESULTS.md and DIR/results.json for `--repeat N`: every target judged on the median of the runs, each run
    kept whole in DIR/run-<i>/."""
    targets = repeated_targets(runs)
    names = [f"run-{r}" for r in range(1, len(runs) + 1)]
    document = {"command": command, "preset": preset, "machine": machine, "repeat": len(runs), "runs": names}
    (out / "results.json").write_text(json.dumps(document | {"targets": targets}, indent=2, default=str))
    lines = [
        "# akd bench, repeated",
        "",
        f"- command: `{command}` (config: {preset}; {repetitions} repetitions a point in each run, medians)",
        f"- machine: {machine['cores']} cores ({machine['cpu']}), torch {machine['torch']} "
        f"({machine['torch_threads']} threads), Python {machine['python']}",
        f"- finished: {machine['date']}, commit {machine['git_commit'] or 'unknown'}",
        f"- {len(runs)} whole runs, one after another, each with its own services: "
        + ", ".join(f"[{n}]({n}/RESULTS.md)" for n in names),
        "",
        f"## Targets: the median of {len(runs)} runs",
        "",
        "| benchmark | target | median | spread (min - max) | met, on the median | each run |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        each = ", ".join(f"{t['runs'][r]:.3f}" if r in t["runs"] else "-" for r in range(1, len(runs) + 1))
        lines.append(
            f"| {t['benchmark']} | {t['what']} {t['op']} {t['threshold']:g} | {t['median']:.3f} | "
            f"{t['min']:.3f} - {t['max']:.3f} | {'yes' if t['met'] else '**no**'} | {each} |"
        )
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")


def sharing_figure(sharing: Section, peer: Section | None, path: Path) -> Path:
    """rows/s against the number of clients, one panel per teacher: batching on, off, and the peers measured."""
    teachers = list(dict.fromkeys(r["teacher"] for r in sharing.rows))
    fig, axes = subplots(1, len(teachers), figsize=(5 * len(teachers), 3.8), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        series = {
            f"akd serve, batching {b}": [r for r in sharing.rows if r["teacher"] == teacher and r["batching"] == b]
            for b in ("on", "off")
        }
        theirs = [r for r in sharing.rows if r["teacher"] == teacher and r.get("server") == "Triton"]
        if theirs:
            series["Triton"] = theirs
        if peer:
            series["LitServe"] = [
                {"load": r["load"], "rows/s": r["LitServe rows/s"]}
                for r in peer.rows
                if r["teacher"] == teacher and "LitServe rows/s" in r
            ]
        # each series' rows: one per client count, then the one-client yardstick
        for label, rows in ((k, v) for k, v in series.items() if v):
            *shared, alone = rows
            line = ax.plot(
                [int(r["load"].split(" x ")[0]) for r in shared], [r["rows/s"] for r in shared], "o-", label=label
            )[0]
            ax.axhline(alone["rows/s"], color=line.get_color(), ls=":", lw=1)
        clients = [int(r["load"].split(" x ")[0]) for r in shared]
        ax.set_title(f"{teacher} (dotted: 1 x {alone['load'].split(' x ')[1]} rows)")
        ax.set_xlabel(f"concurrent clients x {shared[0]['load'].split(' x ')[1]} rows")
        ax.set_ylabel("rows / s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.legend(fontsize=8)
    return save_figure(fig, path)
