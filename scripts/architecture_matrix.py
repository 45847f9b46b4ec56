"""Every strategy on every architecture family: does it train and evaluate, or refuse in one line?

    python scripts/architecture_matrix.py                              # the whole matrix
    python scripts/architecture_matrix.py --models test_resnet,bert --strategies finetune,l2sp
    python scripts/architecture_matrix.py --jobs 2 --markdown matrix.md

Strategies are every `strategy=` the CLI accepts (configs/strategy/*.yaml and the registry), so new
ones join the matrix by existing. Models: timm's random-init `test_*` networks, one per family
(ResNet; EfficientNet: depthwise + squeeze-excitation; ConvNeXt: LayerNorm, no BatchNorm; ViT:
tokens and a class token; MaxViT: hierarchical with windowed attention; NFNet: no normalisation
layers), the real ImageNet EfficientNet-Lite0, tiny random BERT, RoBERTa, DistilBERT, DeBERTa-v2 and
ELECTRA encoders built here offline (`AutoConfig.for_model`, each with a tokenizer of its own kind
trained on the sentiment task's sentences), and the real all-MiniLM-L6-v2.

A cell is the command line a user would type: `transfer-cli train trainer=smoke ...` (2 epochs of 2
batches of 8) then `transfer-cli eval run=...`, called through the CLI's entry point in one worker
process per model, so the imports are paid once per model. trainer=smoke caps the training loop but
not what a strategy does before it, so the cells shorten that too (SETUP_OVERRIDES: DELTA's channel
attention on one batch after a one-epoch probe, TransTailor's factors trained one epoch and pruned in
one round); the code paths are the same. Outcomes:
  ok       trained and evaluated;
  refused  exit status 2 with one line before any epoch was trained (the method does not apply);
  failed   a traceback, or an error once training had begun.
The step time is the run's train_time_s per optimizer step over finetune's on the same model: a
smoke run's 4 steps, so a rough figure (a feature cache's one pass over the data is in it).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "transfer_cli"
SENTIMENT = PACKAGE / "assets" / "sentiment"
BASELINE = "finetune"
RESULT_PREFIX = "MATRIX_CELL "

#: strategy -> overrides that shorten its setup (smoke caps only the training loop); same code paths
SETUP_OVERRIDES = {
    "delta": ["strategy.attention_epochs=1", "strategy.attention_batches=1"],
    "transtailor": ["strategy.alpha.epochs=1", "strategy.alpha.recovery_epochs=1", "strategy.prune.step=0.3"],
}
IMAGE_DATA = ["data=digits", "backbone.image_size=64"]
TEXT_DATA = ["data=csv_text", f"data.train_file={SENTIMENT / 'train.csv'}", f"data.test_file={SENTIMENT / 'test.csv'}",
             "data.samples_per_class=8", "data.max_length=32", "optim=adamw", "optim.lr=0.0002"]

#: model -> (family, what makes it that family)
TIMM_MODELS = {
    "test_resnet": "ResNet (BatchNorm, residual blocks)",
    "test_efficientnet": "EfficientNet (depthwise convolutions, squeeze-excitation)",
    "test_convnext": "ConvNeXt (LayerNorm, no BatchNorm)",
    "test_vit": "ViT (patch tokens, class-token pooling)",
    "test_maxvit": "MaxViT (hierarchical, windowed + grid attention)",
    "test_nfnet": "NFNet (normalisation-free, scaled weight standardisation)",
}
#: tiny random encoders: model_type -> config sizes (DistilBERT names its sizes differently)
TINY_TEXT = {
    "bert": {},
    "roberta": {},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 37},
    "deberta-v2": {},
    "electra": {"embedding_size": 16},
}
TINY_SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
REAL_MODELS = {
    "efficientnet_lite0": ("EfficientNet-Lite0, real ImageNet weights", ["backbone=efficientnet_lite0", *IMAGE_DATA]),
    "minilm": ("all-MiniLM-L6-v2, real weights", ["backbone=minilm", *TEXT_DATA]),
}


def model_names() -> list[str]:
    return [*TIMM_MODELS, "efficientnet_lite0", *TINY_TEXT, "minilm"]


def family(model: str) -> str:
    if model in TIMM_MODELS:
        return TIMM_MODELS[model]
    if model in REAL_MODELS:
        return REAL_MODELS[model][0]
    return f"tiny random {model} (transformers)"


def strategy_names() -> list[str]:
    """Every strategy the CLI accepts: its config files and the registry, finetune first."""
    import transfer_cli.strategies  # noqa: F401  (registers every strategy)
    from transfer_cli.strategies.base import STRATEGIES

    names = set(STRATEGIES.names()) | {p.stem for p in (PACKAGE / "configs" / "strategy").glob("*.yaml")}
    return [BASELINE, *sorted(names - {BASELINE})]


# ---- tiny Hugging Face encoders, offline ---------------------------------------------------------
def sentences() -> list[str]:
    return [row["text"] for name in ("train.csv", "test.csv") for row in csv.DictReader(open(SENTIMENT / name))]


def tiny_tokenizer(model_type: str):
    """A tokenizer of the model's own kind (WordPiece, byte-level BPE, Unigram), trained on the task's sentences."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if model_type == "roberta":
        special = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                   "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.train_from_iterator(sentences(), trainers.BpeTrainer(
            vocab_size=300, special_tokens=list(dict.fromkeys(special.values())),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")))
        return transformers.RobertaTokenizerFast(tokenizer_object=tokenizer, **special)
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    if model_type == "deberta-v2":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        tokenizer.train_from_iterator(sentences(), trainers.UnigramTrainer(
            vocab_size=200, special_tokens=list(special.values()), unk_token="[UNK]"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
        return transformers.DebertaV2TokenizerFast(tokenizer_object=tokenizer, bos_token="[CLS]", eos_token="[SEP]", **special)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(sentences(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=list(special.values())))
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]")))
    fast = {"distilbert": transformers.DistilBertTokenizerFast, "electra": transformers.ElectraTokenizerFast}
    return fast.get(model_type, transformers.BertTokenizerFast)(tokenizer_object=tokenizer, **special)


def tiny_text_model(model_type: str, folder: Path) -> Path:
    """A 2-layer, 32-wide random encoder of `model_type` and its tokenizer, saved like a hub folder."""
    import torch
    from transformers import AutoConfig, AutoModel

    tokenizer = tiny_tokenizer(model_type)
    sizes = TINY_TEXT[model_type] if model_type == "distilbert" else {**TINY_SIZES, **TINY_TEXT[model_type]}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=64,
                                  pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def model_overrides(model: str, workdir: Path) -> list[str]:
    if model in TIMM_MODELS:
        return ["backbone=timm", f"backbone.name={model}", *IMAGE_DATA]
    if model in REAL_MODELS:
        return REAL_MODELS[model][1]
    return ["backbone=hf", f"backbone.weights={tiny_text_model(model, workdir / 'model')}", *TEXT_DATA]


# ---- one cell, through the CLI ---------------------------------------------------------------------
def run_cell(model: str, strategy: str, overrides: list[str], run_dir: Path, extra: list[str]) -> dict:
    """`transfer-cli train` then `transfer-cli eval`, in this process; what happened, in one record."""
    from transfer_cli.cli import main

    train = ["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={run_dir}", f"strategy={strategy}",
             *overrides, *SETUP_OVERRIDES.get(strategy, []), *extra]
    cell = {"model": model, "strategy": strategy}
    code, message = _call(main, train)
    if code == 0:
        code, message = _call(main, ["eval", f"run={run_dir}"])
        if code != 0:
            return {**cell, "outcome": "failed", "message": f"eval: {message}"}
        results = json.loads((run_dir / "results.json").read_text())
        steps = max(1, int(_last_metrics(run_dir).get("step", 1)))
        return {**cell, "outcome": "ok", "acc1": results["test"]["acc1"],
                "ms_per_step": 1000 * float(results["train_time_s"]) / steps}
    started = bool(_last_metrics(run_dir))
    outcome = "refused" if code == 2 and not started and not message.startswith("Traceback") else "failed"
    return {**cell, "outcome": outcome, "message": message}


def _call(main, argv: list[str]) -> tuple[int, str]:
    """Exit status and the error the CLI printed: its `transfer-cli: error:` line, or for a crash
    "Traceback: " and the exception's line (Hydra's own advice lines skipped)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main(argv)
        return 0, ""
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:  # noqa: BLE001 - a crash is a failed cell
        err.write(traceback.format_exc())
        code = 1
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("transfer-cli: error:")]
    if errors and code == 2:
        return code, errors[-1][len("transfer-cli: error:"):].strip()
    crash = [ln for ln in lines if not ln.startswith((" ", "Set the environment variable HYDRA_FULL_ERROR"))]
    return code, "Traceback: " + (crash[-1] if crash else f"exit status {code}")


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


def worker(model: str, strategies: list[str], extra: list[str]) -> None:
    """All of one model's cells, in this process; one result line each on stdout."""
    with tempfile.TemporaryDirectory(prefix=f"matrix_{model}_") as tmp:
        workdir = Path(tmp)
        overrides = model_overrides(model, workdir)
        for strategy in strategies:
            record = run_cell(model, strategy, overrides, workdir / strategy, extra)
            print(RESULT_PREFIX + json.dumps(record), flush=True)


def run_model(model: str, strategies: list[str], extra: list[str], timeout: float) -> list[dict]:
    """One model's worker process; cells it never reported (a crash, the timeout) are failed."""
    cmd = [sys.executable, __file__, "--worker", model, "--strategies", ",".join(strategies), *sum((["--override", o] for o in extra), [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, why = proc.stdout, (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    except subprocess.TimeoutExpired as e:
        out, why = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), f"worker timed out after {timeout:.0f} s"
    records = [json.loads(ln[len(RESULT_PREFIX):]) for ln in out.splitlines() if ln.startswith(RESULT_PREFIX)]
    done = {r["strategy"] for r in records}
    records += [{"model": model, "strategy": s, "outcome": "failed", "message": f"worker: {why}"} for s in strategies if s not in done]
    print(f"{model}: " + ", ".join(f"{r['strategy']} {r['outcome']}" for r in records), file=sys.stderr, flush=True)
    for r in records:
        if r["outcome"] != "ok":
            print(f"  {r['strategy']} {r['outcome']}: {r['message']}", file=sys.stderr, flush=True)
    return records


# ---- the table ---------------------------------------------------------------------------------
def cell_text(record: dict | None, baseline: dict | None) -> str:
    if record is None:
        return "–"
    if record["outcome"] != "ok":
        return record["outcome"]
    if baseline and baseline.get("outcome") == "ok" and baseline["ms_per_step"] > 0:
        return f"ok {record['ms_per_step'] / baseline['ms_per_step']:.1f}×"
    return "ok"


def table(records: list[dict], models: list[str], strategies: list[str]) -> list[str]:
    by_cell = {(r["model"], r["strategy"]): r for r in records}
    lines = ["| strategy | " + " | ".join(f"`{m}`" for m in models) + " |", "|---|" + "---|" * len(models)]
    for strategy in strategies:
        cells = [cell_text(by_cell.get((m, strategy)), by_cell.get((m, BASELINE))) for m in models]
        lines.append(f"| `{strategy}` | " + " | ".join(cells) + " |")
    return lines


def notes(records: list[dict]) -> list[str]:
    """Each refusal and failure with its one line, grouped by strategy and message."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for r in records:
        if r["outcome"] != "ok":
            grouped.setdefault((r["outcome"], r["strategy"], r["message"]), []).append(r["model"])
    return [f"- {outcome} `{strategy}` on {', '.join(models)}: {message}"
            for (outcome, strategy, message), models in sorted(grouped.items())]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma-separated (default: all of {', '.join(model_names())})")
    parser.add_argument("--strategies", default=None, help="comma-separated (default: every strategy the CLI accepts)")
    parser.add_argument("--override", action="append", default=[], help="an extra KEY=VALUE for every cell")
    parser.add_argument("--jobs", type=int, default=1, help="models run at a time")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per model's worker")
    parser.add_argument("--markdown", default=None, help="also write the table and notes to this file")
    parser.add_argument("--json", default=None, help="also write every cell's record to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    strategies = args.strategies.split(",") if args.strategies else strategy_names()
    if args.worker:
        worker(args.worker, strategies, args.override)
        return 0
    models = args.models.split(",") if args.models else model_names()
    unknown = [m for m in models if m not in model_names()]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(model_names())}")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = [r for rs in pool.map(lambda m: run_model(m, strategies, args.override, args.timeout), models) for r in rs]
    lines = ["Models: " + "; ".join(f"`{m}` {family(m)}" for m in models), "", *table(records, models, strategies),
             "", *notes(records)]
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    return 1 if any(r["outcome"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
