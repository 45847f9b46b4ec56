"""`transfer-cli analyze cka|interpolate|criticality|spectrum RUN [...]`: parse, run, write, print."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from transfer_cli.analysis.cka import POOLS, analyze_cka
from transfer_cli.analysis.criticality import analyze_criticality
from transfer_cli.analysis.interpolate import analyze_interpolation
from transfer_cli.analysis.output import Analysis
from transfer_cli.analysis.runs import LoadedRun, load_run
from transfer_cli.analysis.spectrum import SPLITS, analyze_spectrum
from transfer_cli.errors import TransferCliError
from transfer_cli.run_folder import run_config


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one TransferCliError line instead of usage text and exit."""

    def error(self, message: str) -> None:
        raise TransferCliError(f"analyze: {message} (see transfer-cli analyze --help)")


def _count(text: str) -> Optional[int]:
    """A positive number of examples, or `all`."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of examples (or all)")
    return int(text)


def _steps(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: need a whole number of at least 2 (λ = 0 and 1)")
    return int(text)


def _add_runs(parser: argparse.ArgumentParser, other: Optional[str] = None) -> None:
    parser.add_argument("run", type=Path, metavar="RUN", help="a finished run's folder (the output goes there)")
    if other:
        parser.add_argument("other", type=Path, nargs="?", metavar="OTHER", help=other)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transfer-cli analyze", description="What was transferred: analyses of finished runs. "
                     "Each writes <RUN>/analysis/<name>.json, .md and .png and prints the table.")
    commands = parser.add_subparsers(dest="analysis", required=True, parser_class=_Parser)

    cka = commands.add_parser("cka", help="linear CKA per layer group: RUN vs the pretrained backbone, or vs OTHER")
    _add_runs(cka, "another run of the same backbone and classes (default: the pretrained backbone)")
    cka.add_argument("--max-examples", type=_count, default=500, help="test examples used (default 500)")
    cka.add_argument("--pool", choices=POOLS, default="flatten",
                     help="flatten each group output to C·H·W (default) or average it over positions")

    interpolate = commands.add_parser("interpolate", help="test loss/accuracy from RUN's initial weights to RUN, "
                                                          "or from RUN to OTHER")
    _add_runs(interpolate, "the end point λ=1, another run (default: RUN is the end, its initial weights the start)")
    interpolate.add_argument("--steps", type=_steps, default=11, help="points on λ ∈ [0, 1] (default 11)")
    interpolate.add_argument("--max-examples", type=_count, default=None, help="test examples (default all)")
    interpolate.add_argument("--bn-examples", type=_count, default=None,
                             help="training examples for the BatchNorm statistics (default all)")

    criticality = commands.add_parser("criticality", help="test accuracy drop when one layer group is rewound")
    _add_runs(criticality)
    criticality.add_argument("--max-examples", type=_count, default=None, help="test examples (default all)")
    criticality.add_argument("--bn-examples", type=_count, default=None,
                             help="training examples for the BatchNorm statistics (default all)")

    spectrum = commands.add_parser("spectrum", help="singular values of the penultimate features")
    _add_runs(spectrum)
    spectrum.add_argument("--split", choices=SPLITS, default="test", help="features of this split (default test)")
    spectrum.add_argument("--max-examples", type=_count, default=500, help="examples used (default 500)")
    return parser


def _analysis(args: argparse.Namespace, loaded: LoadedRun) -> Analysis:
    if args.analysis == "cka":
        return analyze_cka(loaded, args.other, args.max_examples, args.pool)
    if args.analysis == "interpolate":
        return analyze_interpolation(loaded, args.other, args.steps, args.max_examples, args.bn_examples)
    if args.analysis == "criticality":
        return analyze_criticality(loaded, args.max_examples, args.bn_examples)
    return analyze_spectrum(loaded, args.split, args.max_examples)


def analyze(argv: Sequence[str]) -> Path:
    """Run one analysis from command-line arguments; print its table; return the output folder."""
    args = build_parser().parse_args(list(argv))
    run_dir = args.run.expanduser()
    loaded = load_run(run_config(run_dir, {}), run_dir)
    result = _analysis(args, loaded)
    folder = result.write(run_dir)
    print(result.markdown)
    print(f"-> {folder / result.name}.json, .md, .png")
    return folder
