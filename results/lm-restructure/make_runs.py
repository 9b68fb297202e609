"""Tiny reference runs: python make.py OUTDIR (PYTHONPATH selects the code)."""
import os, random, subprocess, sys
from pathlib import Path

out = Path(sys.argv[1]).resolve()
out.mkdir(parents=True, exist_ok=True)
env = dict(os.environ, OMP_NUM_THREADS="1", RNNREG_NATIVE="0", RNNREG_ENGINE="python", MKL_NUM_THREADS="1")
PHRASES = ("the cat sat on the mat", "the dog ran to the park", "a bird flew over the tree",
           "my friend ate a red apple", "the cat ate the fish", "a dog sat under the tree",
           "one big green frog jumped into the cold pond", "we saw many stars last night")
corpus = out / "corpus"
corpus.mkdir(exist_ok=True)
rng = random.Random(0)
for split, n in (("train", 400), ("valid", 50), ("test", 50)):
    (corpus / f"{split}.txt").write_text("".join(rng.choice(PHRASES) + "\n" for _ in range(n)))

TINY = ["--hidden-size", "16", "--num-layers", "2", "--batch-size", "4", "--bptt", "8",
        "--eval-bptt", "20", "--log-every", "3", "--data-dir", str(corpus), "--no-progress",
        "--no-download", "--device", "cpu"]

def cli(name, *args):
    r = subprocess.run([sys.executable, "-m", "rnnreg", *args], env=env, capture_output=True,
                       text=True, cwd=out)
    (out / f"{name}.out").write_text(f"rc={r.returncode}\n--stdout\n{r.stdout}--stderr\n{r.stderr}")

cli("plain", "train", "--out", "plain", "--strategy", "zaremba", "--dropout", "0.3",
    "--epochs", "3", *TINY)
cli("plain_eval", "evaluate", "plain", "--no-progress", "--device", "cpu", "--json")
cli("plain_eval_mc", "evaluate", "plain", "--no-progress", "--device", "cpu", "--mc-samples", "2", "--weights", "last")
cli("plain_gen", "generate", "plain", "--device", "cpu")
cli("awd", "train", "--out", "awd", "--strategy", "awd", "--dropout", "0.3",
    "--weight-dropout", "0.4", "--optimizer", "asgd", "--asgd-nonmono", "1", "--lr", "30",
    "--variable-bptt", "--epochs", "5", "--embedding-dropout", "0.1", "--activation-reg", "2",
    "--temporal-activation-reg", "1", "--tie-weights", *TINY)
cli("awd_eval", "evaluate", "awd", "--no-progress", "--device", "cpu", "--json")
# killed after step 7 (checkpoint every 3 steps), then resumed by the CLI
kill = f"""
import sys
from rnnreg import Config, train
cfg = Config(hidden_size=16, num_layers=2, batch_size=4, bptt=8, eval_bptt=20, log_every=3,
             epochs=3, strategy="variational", **{{"{os.environ.get('PKEY', 'dropout')}": 0.3}},
             checkpoint_steps=3, device="cpu")
class Killed(Exception): pass
def on_step(step):
    if step == 7:
        raise Killed
try:
    train(cfg, "killed", data_dir={str(corpus)!r}, progress=False, on_step=on_step)
except Killed:
    print("killed at 7")
"""
r = subprocess.run([sys.executable, "-c", kill], env=env, capture_output=True, text=True, cwd=out)
(out / "killed_first.out").write_text(f"rc={r.returncode}\n{r.stdout}--stderr\n{r.stderr}")
cli("killed_resume", "train", "--out", "killed", "--resume", "--no-progress", "--data-dir",
    str(corpus), "--no-download")
cli("adaptive", "train", "--out", "adaptive", "--softmax", "adaptive", "--adaptive-cutoffs",
    "5,12", "--strategy", "variational", "--dropout", "0.2", "--epochs", "2", *TINY)
cli("adaptive_eval", "evaluate", "adaptive", "--no-progress", "--device", "cpu", "--json")
cli("study", "compare", "--out", "study", "--strategies", "zaremba,variational", "--rates",
    "0.2", "--preset", "study-small", "--hidden-size", "16", "--batch-size", "4", "--bptt", "8",
    "--epochs", "2", "--eval-bptt", "20", "--log-every", "3", "--train-tokens", "0",
    "--data-dir", str(corpus), "--no-progress", "--device", "cpu")
