"""Reports of a run: results.md (markdown tables, also printed) and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

from fastddim.benchmark.loop import LOOP_IMPLEMENTATIONS, loop_key
from fastddim.benchmark.per_seed import SEEDS_MODES
from fastddim.benchmark.sd import SD_IMPLEMENTATIONS
from fastddim.benchmark.step import STEP_IMPLEMENTATIONS, step_key

GPU_MESSAGE = (
    "GPU figures (Triton kernel, CUDA-graph replay, GB/s against the copy ceiling, whole-loop graphs) need a CUDA GPU: "
    "run `fastddim bench` on one."
)
STEP_ORDER = tuple(STEP_IMPLEMENTATIONS)
LOOP_ORDER = tuple(LOOP_IMPLEMENTATIONS)
SD_ORDER = tuple(SD_IMPLEMENTATIONS)


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    """A figure for a table, or a dash where it was not measured."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def status(record: dict) -> str:
    """A record's outcome for tables and progress lines: pass, ok, FAIL (detail), skipped: why, error: what."""
    if record["skipped"]:
        text = f"skipped: {record['skipped'][:80]}"
    elif record["error"]:
        text = f"error: {record['error'][:80]}"
    elif record["check"] is None:
        text = "ok"
    else:
        text = "pass" if record["check"].get("passed") else f"FAIL ({record['check'].get('detail', '')})"
    # Error texts may hold pipes or newlines, which would break the markdown table.
    return text.replace("|", "/").replace("\n", " ")


def _with_range(record: dict, spec: str, scale: float = 1.0) -> str:
    """``median (p20–p80)`` scaled, or a dash when nothing was measured."""
    if record["median_us"] is None:
        return "–"
    median, p20, p80 = (record[k] * scale for k in ("median_us", "p20_us", "p80_us"))
    return f"{median:{spec}} ({p20:{spec}}–{p80:{spec}})"


def _sort_key(record: dict, order: tuple[str, ...]) -> int:
    return order.index(record["impl"]) if record["impl"] in order else len(order)


def markdown_tables(results: dict) -> str:
    """results.md: the environment line and one table per benchmark."""
    env = results["environment"]
    lines = [
        "# fastddim benchmark",
        "",
        f"{env['device']} · driver {env.get('driver_version') or '–'} · CUDA {env.get('cuda_version') or '–'} · "
        f"torch {env['torch']} · triton {env['triton']} · diffusers {env['diffusers']} · fastddim {env['fastddim']} · "
        f"{env['date']}",
        "",
    ]
    if env["device_type"] != "cuda":
        lines += [f"> {GPU_MESSAGE}", ""]
    records = results["records"]
    steps = [r for r in records if r["benchmark"] == "step"]
    if steps:
        lines += [
            "## Step (one `scheduler.step`)",
            "",
            "median µs: CUDA events with a flushed L2 on GPU (device time), host wall on CPU; latency µs: host wall per "
            "call, back-to-back. GB/s counts model_output + sample (+ noise) read and prev_sample + x_0 written "
            "(backward: also the two output gradients read and the two input gradients written). kind: step, inverse "
            "(DDIM inversion), per-sample ((B,) timesteps; diffusers loops over the samples), backward (forward + "
            "autograd.grad w.r.t. model_output and sample).",
            "",
            "| shape | dtype | kind | eta | thr | impl | check | median µs (p20–p80) | latency µs | GB/s | % copy | "
            "speedup | latency speedup |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = {key: i for i, key in enumerate(dict.fromkeys(step_key(r) for r in steps))}
        for r in sorted(steps, key=lambda r: (order[step_key(r)], _sort_key(r, STEP_ORDER))):
            lines.append(
                f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['config'].get('kind', 'step')} | "
                f"{r['config']['eta']:g} | "
                f"{'on' if r['config']['thresholding'] else 'off'} | {r['impl']} | {status(r)} | "
                f"{_with_range(r, '.2f')} | "
                f"{fmt(r['latency_us'], '.2f')} | {fmt(r['gb_per_s'], '.1f')} | {fmt(r['pct_of_copy_bw'], '.0f', '%')} | "
                f"{fmt(r['speedup_vs_diffusers'], '.2f', '×')} | {fmt(r['latency_speedup_vs_diffusers'], '.2f', '×')} |"
            )
        lines.append("")
    loops = [r for r in records if r["benchmark"] == "loop"]
    if loops:
        lines += [
            "## Loop (whole sampling loop)",
            "",
            "Host wall per pipeline call; capture s = first call minus a warm call; sched share = steps × one "
            "scheduler step alone / loop time; unet-limit = steps × one captured UNet call alone (device time on GPU), "
            "÷ limit = loop time / that limit.",
            "",
            "| model | batch | dtype | impl | status | images/s | ms/step | call ms (p20–p80) | capture s | "
            "peak MiB | sched share | speedup | vs reduce-overhead | ÷ limit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = {key: i for i, key in enumerate(dict.fromkeys(loop_key(r) for r in loops))}
        for r in sorted(loops, key=lambda r: (order[loop_key(r)], _sort_key(r, LOOP_ORDER))):
            model = r["model"] + (" (thresholding)" if r["config"] and r["config"].get("thresholding") else "")
            lines.append(
                f"| {model} | {r['batch_size']} | {r['dtype']} | {r['impl']} | {status(r)} | "
                f"{fmt(r['images_per_s'], '.1f')} | {fmt(r['ms_per_step'], '.3f')} | "
                f"{_with_range(r, '.1f', 1e-3)} | {fmt(r['capture_s'], '.2f')} | "
                f"{fmt(r['peak_mem_mib'], '.0f')} | {fmt(None if r['scheduler_share'] is None else 100 * r['scheduler_share'], '.1f', '%')} | "
                f"{fmt(r['speedup_vs_diffusers'], '.2f', '×')} | "
                f"{fmt(r['speedup_vs_compile_reduce_overhead'], '.2f', '×')} | {fmt(r['vs_limit'], '.3f')} |"
            )
        lines.append("")
    lines += _sd_table([r for r in records if r["benchmark"] == "sd"])
    lines += _seeds_table([r for r in records if r["benchmark"] == "seeds"])
    lines += _eager_table([r for r in records if r["benchmark"] == "eager"])
    reconstructions = [r for r in records if r["benchmark"] == "reconstruction"]
    if reconstructions:
        lines += [
            "## Reconstruction (DDIM inversion, then sampling back, eta 0)",
            "",
            "Per-dimension MSE against the originals in [0, 1], real scikit-learn digits, the embedded model, fp32.",
            "",
            "| S (steps each way) | digits | MSE | std of x_T | seconds | status |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(reconstructions, key=lambda r: r["num_inference_steps"]):
            lines.append(
                f"| {r['num_inference_steps']} | {fmt(r['batch_size'], 'd')} | {fmt(r['mse'], '.5f')} | "
                f"{fmt(r['latent_std'], '.3f')} | {fmt(r['first_call_s'], '.1f')} | {status(r)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _sd_table(records: list[dict]) -> list[str]:
    """The text-to-image loop table (fastddim.benchmark.sd), or nothing without sd records."""
    if not records:
        return []
    lines = [
        "## Text-to-image loop (classifier-free guidance, eta 0)",
        "",
        "Host wall per pipeline call from prompt embeddings to final latents (no text encoder, no VAE decode); check = "
        "relative L2 error of the latents vs diffusers eager; capture/compile s = first call minus a warm call; "
        "unet-limit = steps × one captured UNet call alone on the CFG batch (device time on GPU); ÷ limit = loop time "
        "/ that limit.",
        "",
        "| model | batch | dtype | steps | impl | status | rel. L2 err | images/s | ms/step | call ms (p20–p80) | "
        "capture/compile s | peak MiB | speedup | vs reduce-overhead | ÷ limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def case_key(r: dict) -> tuple:
        return (r["model"], r["dtype"], r["batch_size"], r["num_inference_steps"])

    order = {key: i for i, key in enumerate(dict.fromkeys(case_key(r) for r in records))}
    for r in sorted(records, key=lambda r: (order[case_key(r)], _sort_key(r, SD_ORDER))):
        rel = None if r["check"] is None else r["check"].get("rel_l2_err")
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['dtype']} | {r['num_inference_steps']} | {r['impl']} | "
            f"{status(r)} | {fmt(rel, '.1e')} | {fmt(r['images_per_s'], '.2f')} | {fmt(r['ms_per_step'], '.2f')} | "
            f"{_with_range(r, '.1f', 1e-3)} | {fmt(r['capture_s'], '.2f')} | {fmt(r['peak_mem_mib'], '.0f')} | "
            f"{fmt(r['speedup_vs_diffusers'], '.2f', '×')} | {fmt(r['speedup_vs_compile_reduce_overhead'], '.2f', '×')} "
            f"| {fmt(r['vs_limit'], '.3f')} |"
        )
    return lines + [""]


def _seeds_table(records: list[dict]) -> list[str]:
    """The per-seed noise table (fastddim.benchmark.per_seed), or nothing without seeds records."""
    if not records:
        return []
    lines = [
        "## Per-seed noise (seed-addressed sampling against one generator)",
        "",
        "fastddim.DDIMPipeline calls (output_type='pt', no files written) over seeds 0 .. images − 1 in batches, the "
        "three noise modes interleaved batch by batch; images/s = images / summed call time; cost = one generator's "
        "(or no generator's) images/s / this one's − 1.",
        "",
        "| model | batch | dtype | steps | eta | noise | status | images | images/s | call ms (p20–p80) | "
        "first call s | cost vs generator | cost vs no generator |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = tuple(SEEDS_MODES)

    def case_key(r: dict) -> tuple:
        return (r["model"], r["batch_size"], r["dtype"], r["num_inference_steps"], r["config"]["eta"])

    cases = {key: i for i, key in enumerate(dict.fromkeys(case_key(r) for r in records))}
    for r in sorted(records, key=lambda r: (cases[case_key(r)], _sort_key(r, order))):
        costs = [None if r[k] is None else 100 * r[k] for k in ("cost_vs_generator", "cost_vs_no_generator")]
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['dtype']} | {r['num_inference_steps']} | {r['config']['eta']:g} | "
            f"{r['impl']} | {status(r)} | {fmt(r['images'], 'd')} | {fmt(r['images_per_s'], '.1f')} | "
            f"{_with_range(r, '.1f', 1e-3)} | {fmt(r['first_call_s'], '.2f')} | {fmt(costs[0], '+.1f', ' %')} | "
            f"{fmt(costs[1], '+.1f', ' %')} |"
        )
    return lines + [""]


def _eager_table(records: list[dict]) -> list[str]:
    """The interleaved eager-loop table (fastddim.benchmark.eager), or nothing without eager records."""
    if not records:
        return []
    lines = [
        "## Eager loops, interleaved (diffusers vs fastddim with cuda_graph=False)",
        "",
        "Host wall per pipeline call, the two implementations alternating round by round on one UNet (order swapped "
        "every round); paired speedup = median over rounds of diffusers' time / fastddim's in the same round (p20–p80); "
        "check = relative L2 error vs diffusers from the same initial noise.",
        "",
        "| pipeline | model | batch | dtype | steps | impl | status | rel. L2 err | ms/step | call ms (p20–p80) | "
        "speedup (medians) | paired speedup (p20–p80) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rel = None if r["check"] is None else r["check"].get("rel_l2_err")
        paired = fmt(r["paired_speedup_vs_diffusers"], ".3f", "×")
        if r["paired_speedup_p20"] is not None:
            paired += f" ({r['paired_speedup_p20']:.3f}–{r['paired_speedup_p80']:.3f})"
        lines.append(
            f"| {r['config']['pipeline']} | {r['model']} | {r['batch_size']} | {r['dtype']} | "
            f"{fmt(r['num_inference_steps'], 'd')} | {r['impl']} | {status(r)} | {fmt(rel, '.1e')} | "
            f"{fmt(r['ms_per_step'], '.3f')} | {_with_range(r, '.1f', 1e-3)} | "
            f"{fmt(r['speedup_vs_diffusers'], '.3f', '×')} | {paired} |"
        )
    return lines + [""]


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """PNG plots: step µs (and latency) vs tensor size per implementation; loop images/s vs batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = results["records"]
    written = []
    steps = [
        r
        for r in records
        if r["benchmark"] == "step"
        and r["median_us"]
        and r["config"]["eta"] == 0
        and not r["config"]["thresholding"]
        and r["config"].get("kind", "step") == "step"
    ]
    for field, filename, ylabel in (
        ("median_us", "step_us_vs_size.png", "µs per step (device time on GPU)"),
        ("latency_us", "step_latency_vs_size.png", "µs per step (host wall, back-to-back)"),
    ):
        dtypes = sorted({r["dtype"] for r in steps}) or ["none"]
        fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes, strict=True):
            for color, impl in enumerate(STEP_ORDER):
                points = sorted(
                    (r["numel"], r[field]) for r in steps if r["dtype"] == dtype and r["impl"] == impl and r[field]
                )
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=impl, color=f"C{color}")
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="elements per tensor",
                ylabel=ylabel,
                title=f"DDIM step, {dtype}, eta=0",
            )
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(results["environment"]["device"])
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=110)
        plt.close(fig)
        written.append(out_dir / filename)

    loops = [
        r
        for r in records
        if r["benchmark"] == "loop" and r["images_per_s"] and not (r["config"] and r["config"].get("thresholding"))
    ]
    panels = sorted({(r["model"], r["dtype"]) for r in loops}) or [("none", "")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], panels, strict=True):
        for color, impl in enumerate(LOOP_ORDER):
            points = sorted(
                (r["batch_size"], r["images_per_s"])
                for r in loops
                if (r["model"], r["dtype"], r["impl"]) == (model, dtype, impl)
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl, color=f"C{color}")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title=f"{model} {dtype}".strip())
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{results['environment']['device']} · {results['settings']['num_inference_steps']}-step loops")
    fig.tight_layout()
    fig.savefig(out_dir / "loop_images_per_s.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "loop_images_per_s.png")
    return written
