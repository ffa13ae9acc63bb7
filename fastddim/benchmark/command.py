"""``fastddim bench`` and ``python -m fastddim.benchmark``: options, checks before any case runs, exit status.

Exit status: 0 when every case ran (or was legitimately skipped: a ``torch.compile`` case past ``--budget-s``, an
implementation unavailable here) and passed its correctness check; 1 when a case errored or failed its check; 2 for a
bad option or environment (an unusable ``--out`` or ``--device``), reported as one ``error: ...`` line on stderr before
anything runs or is written.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from fastddim.benchmark.cases import DEFAULT_BUDGET_S, NUM_INFERENCE_STEPS
from fastddim.benchmark.report import GPU_MESSAGE, markdown_tables
from fastddim.benchmark.runner import make_plan, progress, run_benchmarks, summarize_outcomes
from fastddim.timing import default_device, device_name, device_slug
from fastddim.utils import first_line, parse_device

DEFAULT_OUT = "bench-out"
EXIT_FAILED = 1
EXIT_USAGE = 2


class BenchUsageError(Exception):
    """A bad option or environment: one ``error:`` line on stderr and exit status 2, as elsewhere in the CLI."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _regex(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({exc})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``fastddim bench``'s options to ``parser``."""
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output folder (default: {DEFAULT_OUT}/)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small shapes only, no torch.compile: minutes on a CPU (torch backend vs diffusers)",
    )
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        choices=("all", "step", "loop", "sd", "reconstruction", "seeds", "eager"),
        default="all",
        help="which benchmark to run",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile implementations")
    parser.add_argument(
        "--budget-s",
        type=_non_negative_float,
        default=DEFAULT_BUDGET_S,
        help=f"skip torch.compile cases that would start after this many seconds (default: {DEFAULT_BUDGET_S:.0f})",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"inference steps per loop (default: {NUM_INFERENCE_STEPS}; text-to-image cases: 30 and 50)",
    )
    parser.add_argument(
        "--sd-cases",
        type=_regex,
        default=None,
        metavar="REGEX",
        help="run only the text-to-image cases whose label (e.g. 'sd15 batch=1 fp16 steps=30 cfg=7.5') matches REGEX",
    )
    parser.add_argument(
        "--loop-cases",
        type=_regex,
        default=None,
        metavar="REGEX",
        help="run only the loop cases whose label (e.g. 'digits batch=16 fp16 thresholding') matches REGEX",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (torch.set_num_threads; default: torch's choice)",
    )
    parser.add_argument(
        "--print-device-slug",
        action="store_true",
        help="print this device's folder name (e.g. for baselines) and exit",
    )


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device`` names, with an explicit CUDA index.

    Raises:
        BenchUsageError: not a torch device, not cpu or cuda, CUDA unavailable, or no such CUDA index.
    """
    if name is None:
        return default_device()
    try:
        return parse_device(name)
    except ValueError as exc:
        raise BenchUsageError(f"--device {name}: {exc}") from None


def check_out_dir(out: Path) -> None:
    """Fails unless ``out`` is (or can be made) a writable folder; creates it when it can.

    Raises:
        BenchUsageError: ``out`` is a file, lies under a file, or is not writable.
    """
    if out.exists() and not out.is_dir():
        raise BenchUsageError(f"--out {out}: is a file, not a folder")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BenchUsageError(f"--out {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BenchUsageError(f"--out {out}: {ancestor} is not writable")
    try:
        # os.access trusts permission bits; a read-only mount (or root's view of one) only shows on a real write.
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise BenchUsageError(f"--out {out}: not writable ({first_line(exc)})") from None


def run(args: argparse.Namespace) -> int:
    """Runs ``fastddim bench`` with parsed options.

    Returns:
        `int`: 0 when every case passed (or was legitimately skipped), 1 when a case errored or failed its correctness
        check, 2 for a bad ``--out`` or ``--device`` (one ``error:`` line on stderr, nothing run or written).
    """
    try:
        return _run(args)
    except BenchUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.print_device_slug:
        print(device_slug(device))
        return 0
    check_out_dir(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type != "cuda":
        progress(f"Running on {device_name(device)} with the torch backend. {GPU_MESSAGE}")
        if not (args.quick or args.tiny):
            progress("Without a GPU only --quick is meaningful; running the --quick matrix.")
            args.quick = True
    results = run_benchmarks(make_plan(args, device), device, args.out, plots=not args.no_plots)
    print(markdown_tables(results))
    written = ", ".join(str(path) for path in results["written"])
    print(f"\nWrote {written} in {results['elapsed_s']:.0f} s.")
    if device.type != "cuda":
        print(GPU_MESSAGE)
    by_outcome = summarize_outcomes(results["records"])
    print(
        f"{len(results['records'])} cases: {len(by_outcome['ok'])} ok, {len(by_outcome['skipped'])} skipped (not "
        f"errors), {len(by_outcome['failed'])} failed the correctness check, {len(by_outcome['error'])} errored."
    )
    for record in by_outcome["skipped"]:
        print(f"  skipped {record['name']}: {record['skipped']}")
    if by_outcome["failed"] or by_outcome["error"]:
        lines = [f"  error {r['name']}: {r['error']}" for r in by_outcome["error"]]
        lines += [f"  check failed {r['name']}: {r['check'].get('detail', '')}" for r in by_outcome["failed"]]
        print(
            f"FAILED: {len(by_outcome['error'])} case(s) errored, {len(by_outcome['failed'])} failed the correctness "
            "check:\n" + "\n".join(lines),
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastddim.benchmark``: parses ``argv`` (default ``sys.argv[1:]``) and runs; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastddim.benchmark", description="Run the fastddim benchmarks.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
