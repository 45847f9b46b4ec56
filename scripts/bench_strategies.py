"""Cost of each transfer strategy per training step, relative to plain fine-tuning, and its memory.

Every registered strategy (transfer_cli.strategies.base.STRATEGIES, so strategies added later are
picked up) runs on the same backbone (a timm backbone's random init, saved once with its classifier so
that the methods needing a source head have one), data and batch: the real run is assembled from the config
(`strategy=<name>` plus the options below), the Trainer prepares it (the strategy's setup, its
loaders) and the Trainer's own `train_step` (forward, penalties, backward, optimizer step) runs on
one fixed batch of the first epoch.

    python scripts/bench_strategies.py                        # timm resnet18 at 64 px, batch 32, CPU
    python scripts/bench_strategies.py --device cuda --backbone resnet50 --image-size 224
    python scripts/bench_strategies.py --override delta:strategy.attention_batches=2
    python scripts/bench_strategies.py --experiment minilm_sentiment --strategies finetune,lora,adapter,bitfit,vpt,ssf
    python scripts/bench_strategies.py --strategies co_tuning,lwf,stochnorm,bi_tuning,l2t_ww,hybrid_forward

ms/step: all strategies are prepared in one process, warmed up, then stepped round-robin (one step
each, --steps times), so a change of load on the machine touches every strategy alike; the median
step time is reported. setup s: everything before the first step (the strategy's setup such as
DELTA's channel attention, a feature cache's pass over the data, building the optimizer).
Peak memory, measured per strategy in a fresh process: what training steps need on top of the
model and the data. On CUDA, torch.cuda.max_memory_allocated() during the steps minus the memory
allocated before the strategy's setup; on CPU, the process's peak resident set size during the steps
(VmHWM, reset after setup) minus the resident set size before the setup. Both include the strategy's
own state (θ0, a reference model), gradients, optimizer state and activations; the CPU figure also
counts memory the C allocator kept after the setup freed it, so it is an upper bound.
Optimizer state: the bytes of the optimizer's per-parameter tensors (momentum, Adam moments) after the
steps, and the trainable share of the model's parameters, both from that fresh process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the issues' targets: (strategy, measure, limit); measures are `MEASURES` keys
TARGETS = [("l2sp", "time", 1.10), ("delta", "time", 1.6), ("spottune", "time", 2.3), ("adafilter", "time", 1.8),
           *[(name, measure, limit) for name in ("lora", "adapter", "bitfit", "vpt", "ssf")
             for measure, limit in (("time", 1.0), ("optimizer", 0.05))],
           ("lora", "trainable %", 2.0),  # set for LoRA r=8 on MiniLM (--experiment minilm_sentiment)
           ("co_tuning", "time", 1.2), ("lwf", "time", 1.2), ("stochnorm", "time", 1.2), ("bi_tuning", "time", 2.5),
           ("l2t_ww", "time", 4.0), ("hybrid_forward", "time", 3.5)]
BASELINE = "finetune"
RESULT_PREFIX = "BENCH_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", help="timm model name (random init)")
    parser.add_argument("--experiment", default=None,
                        help="an experiment config instead of --backbone/--image-size and the digits (minilm_sentiment)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", help="trainer.precision (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--strategies", default=None, help="comma-separated subset (default: all registered)")
    parser.add_argument("--override", action="append", default=[],
                        help="KEY=VALUE for every strategy, or NAME:KEY=VALUE for one (e.g. delta:strategy.attention=false)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights file for --backbone (default: its random init, saved once with its "
                             "classifier, so that co_tuning and lwf have a source head)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def overrides_for(name: str, args: argparse.Namespace) -> list[str]:
    if args.experiment:
        model = [f"experiment={args.experiment}", "data.samples_per_class=null"]
    else:
        model = ["backbone=timm", f"backbone.name={args.backbone}", f"backbone.image_size={args.image_size}",
                 "data=digits", "data.samples_per_class=null", f"backbone.weights={args.weights}"]
    common = [f"strategy={name}", *model, f"trainer.batch_size={args.batch_size}", f"trainer.device={args.device}",
              f"trainer.precision={args.precision}", "trainer.progress=false"]
    if args.threads:
        common.append(f"trainer.num_threads={args.threads}")
    for item in args.override:
        target, sep, override = item.partition(":")
        if sep and "=" not in target:
            if target == name:
                common.append(override)
        else:
            common.append(item)
    return common


# ---- one strategy, in a fresh process -----------------------------------------------------------
def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one."""
    Path("/proc/self/clear_refs").write_text("5")


class Prepared:
    """One strategy's run, assembled and prepared by the Trainer, with the batch its steps repeat."""

    def __init__(self, name: str, args: argparse.Namespace):
        import torch

        from transfer_cli.overrides import compose_config
        from transfer_cli.engine.loop import TrainState, Trainer
        from transfer_cli.engine.run import assemble

        self.name = name
        self._tmp = tempfile.TemporaryDirectory()
        cfg = compose_config(overrides_for(name, args))
        run = assemble(cfg)
        self.trainer = trainer = Trainer(run.model, run.strategy, run.loaders["train"], run.loaders["val"],
                                         run.loaders["test"], cfg, Path(self._tmp.name))
        self.device = trainer.device
        self.cuda = self.device.type == "cuda"
        run.model.to(self.device)
        self.sync()
        self.base_memory = torch.cuda.memory_allocated(self.device) if self.cuda else rss_bytes("VmRSS")

        started = time.perf_counter()
        trainer.prepare()
        trainer.begin_epoch(0)
        trainer.model.train()
        trainer.train_loader.set_epoch(0)
        self.batch = next(iter(trainer.train_loader))  # a feature cache fills itself here
        self.sync()
        self.setup_s = time.perf_counter() - started
        self.state = TrainState()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def step(self) -> float:
        """One training step as the Trainer runs it; its wall time in seconds."""
        self.sync()
        begin = time.perf_counter()
        self.trainer.train_step(self.batch, self.state)
        self.sync()
        return time.perf_counter() - begin

    def close(self) -> None:
        self._tmp.cleanup()


def measure_memory(name: str, args: argparse.Namespace) -> dict:
    """Setup time and peak step memory of one strategy, in this (fresh) process."""
    import torch

    run = Prepared(name, args)
    if run.cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    else:
        reset_peak_rss()
    for _ in range(args.warmup + 2):
        run.step()
    peak = torch.cuda.max_memory_allocated(run.device) if run.cuda else rss_bytes("VmHWM")
    optimizer_state = sum(v.numel() * v.element_size() for state in run.trainer.optimizer.state.values()
                          for v in state.values() if torch.is_tensor(v))
    params = list(run.trainer.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
    run.close()
    return {"setup_s": run.setup_s, "peak_mib": (peak - run.base_memory) / 2**20,
            "optimizer_mib": optimizer_state / 2**20, "trainable_pct": 100 * trainable}


def measure_times(names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """Median step time of every strategy, all in this process, their steps interleaved round-robin so
    that a change of load on the machine touches every strategy alike."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs, results = [], {}
    for name in names:
        try:
            runs.append(Prepared(name, args))
        except Exception as err:  # noqa: BLE001 - one strategy failing is a row of the table, not the end
            results[name] = {"error": first_line(err)}
    for run in runs:
        for _ in range(args.warmup):
            run.step()
    times: dict[str, list[float]] = {run.name: [] for run in runs}
    for _ in range(args.steps):
        for run in runs:
            times[run.name].append(run.step())
    for run in runs:
        results[run.name] = {"ms": 1000 * statistics.median(times[run.name]), "device": str(run.device),
                             "threads": torch.get_num_threads()}
        run.close()
    return results


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def child_main(args: argparse.Namespace) -> None:
    print(RESULT_PREFIX + json.dumps(measure_memory(args.child, args)), flush=True)


# ---- the table ----------------------------------------------------------------------------------
def run_child(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", name], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}


def random_weights(backbone: str, folder: str) -> str:
    """The timm backbone's random init with its ImageNet-sized classifier, as a weights file: every strategy
    loads the same weights, and the methods that need a source head (co_tuning, lwf) have one."""
    import safetensors.torch
    import timm

    path = str(Path(folder) / f"{backbone}.safetensors")
    state = timm.create_model(backbone, pretrained=False).state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def registered_strategies() -> list[str]:
    import transfer_cli.strategies  # noqa: F401  (registers every strategy module)
    from transfer_cli.strategies.base import STRATEGIES

    return STRATEGIES.names()


def refused(r: dict) -> bool:
    """The strategy turned this backbone down in its one-line error (VPT on a CNN): not a failed target."""
    return r.get("error", "").startswith("transfer_cli.errors.TransferCliError")


def table(results: dict[str, dict]) -> list[str]:
    base = results.get(BASELINE, {})
    lines = ["| strategy | ms/step | × finetune | peak memory (MiB) | optimizer state (MiB) | × finetune | trainable % "
             "| setup s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| `{name}` | {'refused' if refused(r) else 'failed'}: {r['error'][:120]} | | | | | | |")
            continue
        lines.append(f"| `{name}` | {r['ms']:.1f} | {ratio(r['ms'], base.get('ms'))} | {r['peak_mib']:.0f} "
                     f"| {r['optimizer_mib']:.2f} | {ratio(r['optimizer_mib'], base.get('optimizer_mib'))} "
                     f"| {r['trainable_pct']:.2f} | {r['setup_s']:.1f} |")
    return lines


def ratio(value: float, base: float | None) -> str:
    if not base:
        return "n/a"
    return f"{value / base:.2g}×" if value < 0.1 * base else f"{value / base:.2f}×"


#: what a target limits: a number from one strategy's results and finetune's
MEASURES = {
    "time": ("× finetune step time", lambda r, base: r["ms"] / base["ms"]),
    "optimizer": ("× finetune optimizer state", lambda r, base: r["optimizer_mib"] / base["optimizer_mib"]),
    "trainable %": ("% of the parameters trained", lambda r, base: r["trainable_pct"]),
}


def target_lines(results: dict[str, dict], registered: list[str]) -> list[str]:
    base = results.get(BASELINE, {})
    lines = ["| target | measured | |", "|---|---|---|"]
    for name, measure, limit in TARGETS:
        label, value = MEASURES[measure]
        r = results.get(name)
        target = f"`{name}` ≤ {limit:g} {label}"
        if r is None:
            lines.append(f"| {target} | {'not in --strategies' if name in registered else 'not registered'} | – |")
        elif refused(r):
            lines.append(f"| {target} | refused on this backbone | – |")
        elif "error" in r or "error" in base or not base:
            lines.append(f"| {target} | not measured | FAIL |")
        else:
            got = value(r, base)
            lines.append(f"| {target} | {got:.3g} | {'pass' if got <= limit else 'FAIL'} |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    registered = registered_strategies()
    names = args.strategies.split(",") if args.strategies else registered
    names = [BASELINE] + [n for n in names if n != BASELINE]
    forwarded = list(sys.argv[1:] if argv is None else argv)
    folder = tempfile.TemporaryDirectory()
    if not args.experiment and not args.weights:
        args.weights = random_weights(args.backbone, folder.name)
        forwarded += ["--weights", args.weights]
    memory = {}
    for name in names:  # each in a fresh process: a process's peak memory is its own
        memory[name] = run_child(name, forwarded)
        print(f"memory and setup: {name}: {memory[name]}", file=sys.stderr, flush=True)
    timed = measure_times([n for n in names if "error" not in memory[n]], args)
    results = {n: {**memory[n], **timed.get(n, {})} for n in names}
    first = next((r for r in results.values() if "device" in r), {})
    what = f"experiment={args.experiment}" if args.experiment else f"{args.backbone} at {args.image_size} px"
    print(f"\n{what}, batch {args.batch_size}, device {first.get('device', args.device)}"
          f" ({first.get('threads', '?')} threads); median of {args.steps} steps per strategy, interleaved, "
          f"after {args.warmup} warm-up steps\n")
    print("\n".join(table(results)))
    print()
    print("\n".join(target_lines(results, registered)))


if __name__ == "__main__":
    main()
