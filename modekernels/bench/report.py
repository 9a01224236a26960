"""Report: terminal tables, and in the output folder CSV, JSON, a Markdown summary and PNG charts.

Every section is a list of flat dicts (rows). A table shows the descriptive fields that vary
between rows as columns and puts the ones that are the same in every row above it.
"""
import csv
import json
import pathlib
import sys

from .harness import CASE_FIELDS
from .verify import summarize

# Per section: (descriptive fields, numeric columns as (row key, header, format)).
SECTIONS = {
    "verify": (["op", "shape", "layout", "mode", "direction", "dtype", "worst"],
               [("max_abs", "max abs err", "{:.2e}"), ("max_rel", "max rel err", "{:.2e}"),
                ("atol", "atol", "{:.0e}"), ("rtol", "rtol", "{:.0e}"),
                ("keep_rate", "keep rate", "{:.3f}"), ("passed", "result", "{}")]),
    "verify_summary": (["op", "dtype"],
                       [("checks", "checks", "{}"), ("passed_checks", "passed", "{}"),
                        ("max_rel", "max rel err", "{:.2e}"), ("passed", "result", "{}")]),
    "ops": (CASE_FIELDS,
            [("time_ms", "ms", "{:.3f}"), ("gb_s", "GB/s", "{:.1f}"), ("pct_copy", "% copy", "{:.0f}"),
             ("alloc_pct", "alloc %", "{:.0f}"), ("speedup", "vs torch", "{:.2f}x"),
             ("saved_bytes", "saved B", "{:,}")]),
    "models": (["model", "step", "variant", "shape", "dtype"],
               [("time_ms", "ms", "{:.2f}"), ("speedup", "vs torch", "{:.2f}x"),
                ("peak_bytes", "peak MB", "{:,.1f}")]),
    "distributed": (["op", "variant", "world_size", "shape", "dtype"],
                    [("median_ms", "ms", "{:.2f}"), ("bytes_exchanged", "bytes sent/step", "{:,}")]),
}
_SCALE = {"peak_bytes": 1e-6}  # shown in MB


def _cell(row, key, fmt):
    value = row.get(key)
    if value is None:
        return "-"
    if key == "passed":
        return "pass" if value else "FAIL"
    return fmt.format(value * _SCALE.get(key, 1))


def _grid(rows, section):
    """(line of constant fields, headers, body, number of descriptive columns)."""
    fields, columns = SECTIONS[section]
    constant = [k for k in fields if len({r.get(k) for r in rows}) == 1]
    varying = [k for k in fields if k not in constant]
    headers = varying + [h for _, h, _ in columns]
    body = [[str(r.get(k)) for k in varying] + [_cell(r, k, fmt) for k, _, fmt in columns]
            for r in rows]
    return ", ".join(f"{k}={rows[0][k]}" for k in constant), headers, body, len(varying)


def text_table(rows, section):
    if not rows:
        return "(no results)"
    constant, headers, body, n = _grid(rows, section)
    widths = [max(len(c) for c in col) for col in zip(headers, *body)]

    def line(cells):  # descriptive fields to the left, numbers to the right
        return "  ".join(c.ljust(w) if i < n else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([constant, line(headers), *map(line, body)])


def markdown_table(rows, section):
    if not rows:
        return "(no results)\n"
    constant, headers, body, n = _grid(rows, section)
    align = ["---"] * n + ["---:"] * (len(headers) - n)
    lines = [f"{constant}\n" if constant else "", "| " + " | ".join(headers) + " |",
             "| " + " | ".join(align) + " |", *("| " + " | ".join(r) + " |" for r in body)]
    return "\n".join(lines) + "\n"


def environment_line(env):
    built = env.get("built_with") or {}
    return (f"{env['device_name']} ({env['device']}, {env['threads']} threads of {env['cpu_count']} "
            f"CPUs), torch {env['torch']} (CUDA {env['cuda']}), extension built for "
            f"CUDA {built.get('cuda')} arch {built.get('cuda_arch_list')}, CPU kernels "
            f"{env.get('cpu_kernels')} (torch's {env.get('torch_cpu_capability')}), {env['date']}")


# ---------------------------------------------------------------------------------- files

def _write_csv(path, rows, env):
    env_cols = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in env.items()}
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields, *env_cols])
        writer.writeheader()
        writer.writerows({**r, **env_cols} for r in rows)


def summary_markdown(results):
    env = results["environment"]
    verify = results["verify"]
    failed = [r for r in verify if not r["passed"]]
    parts = [
        "# modekernels benchmark report\n",
        f"- Command: `{results['command']}`",
        f"- Machine: {environment_line(env)}",
        f"- Timing: {env['cache']}",
        f"- Copy roofline: {results['roofline']['gb_s']:.1f} GB/s "
        f"({results['roofline']['nbytes'] / 1e6:.0f} MB moved by `copy_`, cold caches, same run)\n",
        f"## Verification: {len(verify) - len(failed)} of {len(verify)} passed\n",
        "Every check, with the quantity that came closest to its tolerance, is in `verify.csv`.\n",
        markdown_table(summarize(verify), "verify_summary"),
    ]
    if failed:
        parts += ["### Failed checks\n", markdown_table(failed, "verify")]
    untimed = [r for r in results.get("ops", []) if not r["verified"]]
    if untimed:
        parts += ["### Cases that failed their check at the timed size (not timed)\n",
                  *(f"- {r['op']} {r['shape']} {r['dtype']} {r['layout']} {r['mode']} "
                    f"{r['direction']} {r['variant']}: {r['error']}" for r in untimed), ""]
    for section, title in (("ops", "Ops"), ("models", "Models, end to end"),
                           ("distributed", "Distributed")):
        if results.get(section):
            parts += [f"## {title}\n", markdown_table(results[section], section)]
    return "\n".join(parts)


def write(results, out_dir):
    """Writes every section as CSV, results.json, summary.md and the charts; returns the paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # What an earlier run wrote here goes first, so that the folder holds this run's files alone.
    for old in [*(out_dir / f"{s}.csv" for s in SECTIONS), out_dir / "results.json",
                out_dir / "summary.md", *out_dir.glob("throughput-*.png"), *out_dir.glob("speedup-*.png")]:
        old.unlink(missing_ok=True)
    paths = []
    for section in SECTIONS:
        if results.get(section) and section != "verify_summary":
            paths.append(out_dir / f"{section}.csv")
            _write_csv(paths[-1], results[section], results["environment"])
    paths.append(out_dir / "results.json")
    paths[-1].write_text(json.dumps(results, indent=1) + "\n")
    paths.append(out_dir / "summary.md")
    paths[-1].write_text(summary_markdown(results))
    paths += charts(results, out_dir)
    return paths


# --------------------------------------------------------------------------------- charts

_COLORS = {"modekernels": "tab:blue", "torch": "tab:orange", "torch.compile": "tab:green"}


def _case_key(row):
    """The case a row times, without the variant: (op, shape, dtype, layout, mode, direction)."""
    return tuple(str(row[k]) for k in ("op", "shape", "dtype", "layout", "mode", "direction"))


def charts(results, out_dir):
    """Per op: throughput against bytes moved, with the copy roofline; speed-up bars per shape."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts", file=sys.stderr)
        return []
    device = results["environment"]["device"]
    timed = [r for r in results["ops"] if r["verified"]]
    paths = []
    for op in dict.fromkeys(r["op"] for r in timed):
        rows = [r for r in timed if r["op"] == op]
        panels = list(dict.fromkeys((r["mode"], r["direction"]) for r in rows))
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False,
                                 sharey=True)
        for ax, (mode, direction) in zip(axes[0], panels):
            mine = [r for r in rows if (r["mode"], r["direction"]) == (mode, direction)]
            for series in dict.fromkeys((r["variant"], r["dtype"], r["layout"]) for r in mine):
                points = sorted((r["nbytes"], r["gb_s"]) for r in mine
                                if (r["variant"], r["dtype"], r["layout"]) == series)
                variant, dtype, layout = series
                ax.plot(*zip(*points), marker="o", color=_COLORS.get(variant),
                        linestyle="-" if layout == "contiguous" else "--",
                        label=" ".join(part for part in series if part != "contiguous"))
            copy = sorted({(r["nbytes"], r["nbytes"] / r["copy_ms"] / 1e6) for r in mine})
            ax.plot(*zip(*copy), color="black", linewidth=2, label="copy_ (roofline)")
            ax.set(xscale="log", xlabel="bytes that must move", title=f"{mode} {direction}")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("GB/s")
        fig.suptitle(f"{op} on {device}: effective bandwidth against a copy of the same bytes")
        paths.append(out_dir / f"throughput-{op}-{device}.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)

        others = [r for r in rows if r["variant"] != "torch" and r["speedup"]]
        variants = list(dict.fromkeys(r["variant"] for r in others))
        groups = list(dict.fromkeys(_case_key(r) for r in others))
        width = len(variants) + 1
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * width * len(groups)), 4.5))
        for i, variant in enumerate(variants):
            mine = [r for r in others if r["variant"] == variant]
            ax.bar([groups.index(_case_key(r)) * width + i for r in mine],
                   [r["speedup"] for r in mine], label=variant, color=_COLORS.get(variant))
        ax.set_xticks([j * width + (len(variants) - 1) / 2 for j in range(len(groups))],
                      [" ".join(g[1:3]) + "\n" + " ".join(g[3:]) for g in groups],
                      rotation=90, fontsize=6)
        ax.axhline(1.0, color="k", linewidth=1)
        ax.set(ylabel="speed-up over torch eager", title=f"{op} on {device}")
        ax.legend(fontsize=7)
        paths.append(out_dir / f"speedup-{op}-{device}.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths
