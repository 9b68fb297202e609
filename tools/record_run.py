"""Copy a finished run's record into ``results/NAME``: config, metrics, log and a README.

Weights stay out of the repository (they are tens of MB); everything needed to read and audit
the numbers goes in, with this machine's folders rewritten by ``redact_paths``, and the
README's table is generated from ``metrics.jsonl`` so no number is typed by hand.

    python tools/record_run.py runs/ptb-small results/ptb-small \
        --command "rnnreg train --preset small --out runs/ptb-small" --log runs/ptb-small.log
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from redact_paths import redact

from rnnreg.lm.presets import PRESETS
from rnnreg.lm.rundir.layout import RunDir


def epoch_table(records: list[dict]) -> str:
    lines = ["| epoch | lr | train ppl | valid ppl | tokens/s | epoch s |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if r.get("event") == "epoch":
            lines.append(f"| {r['epoch']} | {r['lr']:.4g} | {r['train_ppl']:.2f} | "
                         f"{r['valid_ppl']:.2f} | {r['tokens_per_s']:.0f} | "
                         f"{r['epoch_seconds']:.0f} |")
    return "\n".join(lines)


def final_line(records: list[dict], paper: dict, budget_minutes: float = 0.0) -> str:
    final = next((r for r in reversed(records) if r.get("event") == "final"), None)
    if final is None:
        return "**Partial run: no final evaluation was recorded.**"
    if final["complete"]:
        status = "complete"
    elif budget_minutes and final["train_seconds"] >= budget_minutes * 60:
        status = f"complete: its {budget_minutes:g}-minute training budget ran out, as designed"
    else:
        status = "PARTIAL (stopped before its last epoch)"
    text = (f"Final ({status}, {final['epochs_completed']} epochs): valid perplexity "
            f"**{final['valid_ppl']:.2f}**, test perplexity **{final['test_ppl']:.2f}** "
            f"(test split scored as one stream in {final['test_seconds']:.1f} s); "
            f"{final['parameters']:,} parameters; {final['train_seconds'] / 60:.1f} min of "
            "training.")
    if paper:
        text += (f" Paper: valid {paper.get('valid')}, test {paper.get('test')}.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("dest")
    parser.add_argument("--command", required=True, help="the command(s) that produced the run")
    parser.add_argument("--log", help="the run's console log")
    parser.add_argument("--preset", help="preset whose paper numbers to show")
    parser.add_argument("--note", default="", help="anything a reader must know")
    args = parser.parse_args()
    run, dest = RunDir(args.run), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    saved, config = run.read_record(), run.read_config()
    records = run.read_metrics()
    copies = [(run.config_path, "config.json"), (run.metrics_path, "metrics.jsonl")]
    if args.log:
        copies.append((Path(args.log), "train.log"))
    for source, name in copies:  # a record names no folder of this machine
        (dest / name).write_text(redact(source.read_text(encoding="utf-8")), encoding="utf-8")
    paper = PRESETS[args.preset].paper if args.preset else {}
    machine = json.dumps(saved.get("machine", {}), sort_keys=True)
    readme = "\n\n".join(part for part in [
        f"# {dest.name}",
        f"Command:\n\n```bash\n{args.command}\n```",
        f"Commit: `{saved.get('commit')}`; started {saved.get('started')}.",
        f"Machine: `{machine}`",
        args.note,
        final_line(records, paper, config.max_train_minutes),
        epoch_table(records),
        "Files: `config.json` (resolved config, commit, machine), `metrics.jsonl` (one line per "
        "epoch and a final line), `train.log` (console output).",
    ] if part)
    (dest / "README.md").write_text(readme + "\n")
    print(dest / "README.md")


if __name__ == "__main__":
    main()
